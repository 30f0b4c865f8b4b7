"""Training: how the job trains on the devices it has.

    startup.py      the start-up, before Keras is imported: settings, backend, topology kind, inputs
    backend.py      TensorFlow or JAX, and every rule about them
    precision.py    mixed precision and XLA per device
    topology.py     the tf.distribute strategy, replicas, workers and the chief; the hosts' meeting
    stopping.py     SIGTERM and SIGINT: stop after a step every host agrees on
    steps.py        one training and one evaluation step per backend
    loop.py         the step clock: epochs, hooks, stop votes, validation
    checkpoints.py  the training state saved atomically and resumed exactly
    stages.py       the job's stages: set-up, model and resume, training

Imports the contract, data, model and telemetry.
"""
