"""The Keras backend for `backend` = tensorflow, jax or auto, chosen per device from measurements;
every rule about backends is here.

The model code is the same on both (Keras 3 + KerasHub); what differs is the step (steps.py).
tf.data feeds both, and the SavedModel is written through TensorFlow either way (a JAX model
through jax2tf), so TF Serving and `predict` see no difference.

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

What JAX cannot do fails at the start, before Keras is imported (`decide`): use_xla=false, and a
distribution over several devices or hosts. Keras reads KERAS_BACKEND once, when it is first
imported: `select` runs before anything imports keras (startup.py, for the `train` command).
"""

import dataclasses
import os

from review_trainer.contract.errors import HyperparameterError
from review_trainer.contract.hyperparameters import NAMED_BACKENDS
from review_trainer.training import topology

JAX, TENSORFLOW = "jax", "tensorflow"


@dataclasses.dataclass(frozen=True)
class Backend:
    name: str  # tensorflow or jax
    reason: str  # for the start line: backend_reason=


def choose(requested, *, num_hosts, num_gpus, num_neurons, distribution, use_xla="auto"):
    """(backend, reason) for the `backend` hyperparameter on these devices."""
    if requested in NAMED_BACKENDS:
        return requested, f"backend={requested}"
    if num_neurons:
        return JAX, f"auto: Neuron devices train through JAX (jax-neuronx), on one of the {num_neurons} NeuronCores"
    if use_xla is False:
        return TENSORFLOW, "auto: use_xla=false, which only the TensorFlow step runs"
    if distribution in (topology.MIRRORED, topology.MULTI_WORKER):
        return TENSORFLOW, f"auto: distribution={distribution} is TensorFlow's (the JAX step uses one device)"
    if num_hosts > 1 and distribution != topology.NONE:
        return TENSORFLOW, f"auto: {num_hosts} hosts train with tf.distribute (the JAX step uses one device)"
    if num_gpus > 1 and distribution != topology.NONE:
        return TENSORFLOW, f"auto: {num_gpus} GPUs train with tf.distribute (the JAX step uses one device)"
    if num_gpus:
        return JAX, "auto: a GPU, where JAX is the backend measured (README)"
    return TENSORFLOW, "auto: a CPU, where TensorFlow was measured faster than JAX (README)"


def decide(env, hp, distribution):
    """The job's backend, or a HyperparameterError for what the JAX step cannot do (distribution:
    the topology.Distribution chosen at start-up)."""
    name, reason = choose(hp.backend, num_hosts=len(env.hosts), num_gpus=env.num_gpus, num_neurons=env.num_neurons,
                          distribution=hp.distribution, use_xla=hp.use_xla)
    if name == JAX and hp.use_xla is False:
        raise HyperparameterError("use_xla=false, but backend=jax always compiles with XLA: set use_xla=auto "
                                  "(or true), or backend=tensorflow")
    if name == JAX and distribution.kind != topology.NONE:
        advice = ("Neuron devices train only through JAX: run the job on one instance, or set distribution=none"
                  if env.num_neurons else
                  "set backend=tensorflow (or auto) to train on all of them, or distribution=none to train on one")
        raise HyperparameterError(f"backend=jax trains on one device, but this job would use distribution="
                                  f"{distribution.kind} ({distribution.reason}): {advice}")
    return Backend(name, reason)


def select(backend, env):
    """Sets KERAS_BACKEND for Keras to read when first imported."""
    os.environ["KERAS_BACKEND"] = backend.name
    if backend.name == JAX and not env.num_gpus and not env.num_neurons:
        # The GPU image's CUDA plugin would try to start without a GPU, and log that it failed.
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
