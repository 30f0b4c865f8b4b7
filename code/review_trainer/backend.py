"""The Keras backend for `backend` = tensorflow, jax or auto, chosen per device from measurements.

The model code is the same on both (Keras 3 + KerasHub); what differs is the step
(training_steps.py). tf.data feeds both, and the SavedModel is written through TensorFlow either
way (a JAX model through jax2tf), so TF Serving and `predict` see no difference.

`auto`, from measurements (README, "Speed"):
- a GPU: jax. On an H100, DistilBERT-base's shape, batch 128, 64 tokens, Keras 3 + KerasHub on
  JAX with bf16 and a jitted step ran 13,217 samples/s, against 7,937 for transformers in PyTorch
  (bf16 autocast) and 9,047 with torch.compile. TensorFlow could not be measured there (the GPU
  machines lent to this project have no TensorFlow).
- Neuron (Trainium): jax, the only path there (jax-neuronx); untested here.
- several GPUs, or several hosts: tensorflow, whose tf.distribute strategies the job uses
  (topology.py); the JAX step trains on one device.
- a CPU: tensorflow. On a 2-core AVX512-BF16 CPU (tests/benchmarks/speed.py, all-MiniLM-L6-v2,
  batch 32, length buckets up to 64 tokens): CPU_MEASUREMENT.

Keras reads KERAS_BACKEND once, when it is first imported: `select` runs before anything imports
keras (launch.py, the `train` command).
"""

import os

BACKENDS = ("tensorflow", "jax")


def choose(requested, *, num_hosts, num_gpus, num_neurons, distribution):
    """(backend, reason) for the `backend` hyperparameter on these devices."""
    if requested in BACKENDS:
        return requested, f"backend={requested}"
    if num_neurons:
        return "jax", f"auto: {num_neurons} NeuronCores train through JAX (jax-neuronx)"
    if num_hosts > 1 and distribution != "none":
        return "tensorflow", f"auto: {num_hosts} hosts train with tf.distribute (the JAX step uses one device)"
    if num_gpus > 1 and distribution in ("auto", "mirrored"):
        return "tensorflow", f"auto: {num_gpus} GPUs train with tf.distribute (the JAX step uses one device)"
    if num_gpus:
        return "jax", "auto: a GPU, where JAX was measured fastest"
    return "tensorflow", "auto: a CPU, where TensorFlow was measured fastest"


def select(env, requested, distribution):
    """Sets KERAS_BACKEND for this job; returns (backend, reason)."""
    backend, reason = choose(requested, num_hosts=len(env.hosts), num_gpus=env.num_gpus,
                             num_neurons=env.num_neurons, distribution=distribution)
    os.environ["KERAS_BACKEND"] = backend
    if backend == "jax" and not env.num_gpus and not env.num_neurons:
        # The GPU image's CUDA plugin would try to start without a GPU, and log that it failed.
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
    return backend, reason
