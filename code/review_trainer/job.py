"""The training job, read top to bottom: SageMaker's contract in, an evaluated, published model out.

The `train` command (cli/train.py) has made the start-up decisions before importing Keras
(training/startup.py: the contract, the hyperparameters, the distribution, the backend), and
handles SIGTERM; then `run` calls each stage in turn,
each in the module that owns it, each handing the next a small object:

    set-up and topology    training/stages.py      Devices: strategy, precision, XLA, learning rate
    pretrained checkpoint  model/pretrained.py     Pretrained: the checkpoint and its tokenizer
    channels               data/channels.py        Channels: scanned (or streamed), this worker's share
    rules at the scan      telemetry/rules.py      Rules: class balance now, the other rules in training
    model and resume       training/stages.py      ModelState: built in the strategy's scope, resumed
    training               training/stages.py      Trained: the model, how training ended, who exports
    evaluation             outputs/evaluation.py   Evaluation: the test metrics and predictions
    export and publish     outputs/export.py       the model folder: SavedModel, hf/, manifest
    insights               insights/reports.py     explanations and bias (never fail the job)

Only the chief host evaluates and exports (the training stage says who goes on). Any error ends in
output/failure and a non-zero exit code (contract/errors.py).
"""

import os
import time

from review_trainer.data import open_channels
from review_trainer.insights import reports
from review_trainer.model.pretrained import open_for_job
from review_trainer.outputs import evaluation, export
from review_trainer.telemetry.rules import Rules
from review_trainer.training import stages


def run(startup, stop_signal):
    """The job; startup: the contract, settings, distribution, backend and Debugger config (training/startup.py)."""
    started = time.monotonic()  # explain_max_seconds=auto is a share of the job's time
    env, hp = startup.env, startup.hp
    devices = stages.set_up(startup)
    if devices.idle:  # distribution=none on several hosts: the chief alone trains
        return
    pretrained = open_for_job(hp, env)
    channels = open_channels(env, hp, devices.topology, pretrained.tokenizer)
    reports.check_settings(hp, channels, devices.topology)
    job_rules = Rules.at_the_scan(hp, channels.train, os.path.join(env.output_data_dir, "rules.json"))
    state = stages.build_model(startup, devices, pretrained, channels)
    trained = stages.train(startup, devices, pretrained, state, channels, job_rules, stop_signal)
    if not trained.exports:  # the chief evaluates and exports
        return
    evaluated = evaluation.evaluate_test(trained.model, channels, pretrained.tokenizer, hp)
    export.export_and_publish(startup, devices, pretrained, channels, state, trained, evaluated)
    reports.after_publishing(hp, channels, trained.model, pretrained.tokenizer, evaluated, env.output_data_dir,
                             time.monotonic() - started, stop_signal)
