"""The Keras backend for `backend` = tensorflow, jax or auto, chosen per device from measurements.

The model code is the same on both (Keras 3 + KerasHub); what differs is the step
(training_steps.py). tf.data feeds both, and the SavedModel is written through TensorFlow either
way (a JAX model through jax2tf), so TF Serving and `predict` see no difference.

`auto` (README, "Backends: TensorFlow and JAX"):
- one GPU: jax, the only backend measured on a GPU here. On an H100, DistilBERT-base's shape,
  batch 128, 64 tokens, Keras 3 + KerasHub on JAX with bf16 and a jitted step ran 13,217
  samples/s, against 7,937 for transformers in PyTorch (bf16 autocast) and 9,047 with
  torch.compile; the GPU machines lent to this project have no TensorFlow.
- Neuron (Trainium): jax, the only path there (jax-neuronx); untested here.
- several GPUs or hosts, distribution=mirrored or multi_worker, or use_xla=false: tensorflow. The
  JAX step trains on one device and always compiles with XLA; tf.distribute uses every device.
- a CPU: tensorflow. On this project's 2-core AVX512-BF16 CPU (tests/benchmarks/speed.py,
  all-MiniLM-L6-v2, batch 32, length buckets up to 64 tokens, mixed_bfloat16), TensorFlow
  (oneDNN) trained 70.0 samples/s and JAX (XLA's CPU backend) 41.0, in the same run.

Keras reads KERAS_BACKEND once, when it is first imported: `select` runs before anything imports
keras (launch.py, the `train` command).
"""

import os

NAMED = ("tensorflow", "jax")  # what `auto` resolves to


def choose(requested, *, num_hosts, num_gpus, num_neurons, distribution, use_xla="auto"):
    """(backend, reason) for the `backend` hyperparameter on these devices."""
    if requested in NAMED:
        return requested, f"backend={requested}"
    if num_neurons:
        return "jax", f"auto: Neuron devices train through JAX (jax-neuronx), on one of the {num_neurons} NeuronCores"
    if use_xla is False:
        return "tensorflow", "auto: use_xla=false, which only the TensorFlow step runs"
    if distribution in ("mirrored", "multi_worker"):
        return "tensorflow", f"auto: distribution={distribution} is TensorFlow's (the JAX step uses one device)"
    if num_hosts > 1 and distribution != "none":
        return "tensorflow", f"auto: {num_hosts} hosts train with tf.distribute (the JAX step uses one device)"
    if num_gpus > 1 and distribution != "none":
        return "tensorflow", f"auto: {num_gpus} GPUs train with tf.distribute (the JAX step uses one device)"
    if num_gpus:
        return "jax", "auto: a GPU, where JAX is the backend measured (README)"
    return "tensorflow", "auto: a CPU, where TensorFlow was measured faster than JAX (README)"


def select(env, hp):
    """Sets KERAS_BACKEND for this job's hyperparameters and devices; returns (backend, reason)."""
    backend, reason = choose(hp.backend, num_hosts=len(env.hosts), num_gpus=env.num_gpus,
                             num_neurons=env.num_neurons, distribution=hp.distribution, use_xla=hp.use_xla)
    os.environ["KERAS_BACKEND"] = backend
    if backend == "jax" and not env.num_gpus and not env.num_neurons:
        # The GPU image's CUDA plugin would try to start without a GPU, and log that it failed.
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
    return backend, reason
