"""Telemetry: what a running job tells the people and services watching it.

    metric_log.py        metric and progress lines (SageMaker's metric_definitions read them), TensorBoard
    rules.py             Debugger's rules, evaluated in the job: a run that goes wrong stops itself
    debugger_tensors.py  training tensors in smdebug's layout, for Debugger's rule containers
    profiler.py          the profile report: step times, input wait, host and GPU use, advice
    hooks.py             the above as the training loop's hooks, where the job asks for them

Imports the contract, and no other package: the model and the training state are handed in.
"""
