"""Mixed precision and XLA for `use_amp` / `use_xla` = auto, chosen per device from measurements.

Measured with tests/benchmarks/precision.py (training steps of all-MiniLM-L6-v2's classifier,
batch 32, 64 tokens) on a 2-core AVX512-BF16/AMX CPU, in samples/s and as a ratio to float32:
float32 38.1 (1.00), mixed_bfloat16 57.7 (1.51), mixed_float16 39.0 (1.02), float32 + XLA 39.5
(1.04), mixed_bfloat16 + XLA 36.4 (0.96). So on such CPUs `mixed_bfloat16` without XLA; CPUs
without bf16 instructions keep float32.
- GPU, measured with the first tests/benchmarks/jax_gpu.py on an H100 (the same model code on the
  Keras JAX backend, through Keras's train_on_batch: the GPU machines here have no TensorFlow),
  DistilBERT-base's shape, batch 128, 64 tokens, XLA on: float32 5,940 samples/s, mixed_bfloat16 7,389 (1.24x), mixed_float16 8,433
  (1.42x); without XLA 137. So `mixed_float16` (Keras adds loss scaling) on cards with tensor
  cores (compute capability 7.0+), float32 on older ones, and XLA on. Provisional: those figures
  carry train_on_batch's per-step overhead; tests/benchmarks/gpu.sh measures the product's step.
- Neuron: bf16 (Trainium's native type), as on a CPU with bf16 instructions (stages.py).
"""

import tensorflow as tf
from review_trainer.contract.hyperparameters import AUTO


def gpu_compute_capability():
    """The lowest compute capability among visible GPUs, or None without a GPU."""
    capabilities = [
        tf.config.experimental.get_device_details(gpu).get("compute_capability")
        for gpu in tf.config.list_physical_devices("GPU")
    ]
    capabilities = [c for c in capabilities if c]
    return min(capabilities) if capabilities else None


def cpu_has_bf16():
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def choose_policy(use_amp, capability, has_bf16):
    """The Keras dtype policy for `use_amp` (True, False or auto)."""
    if use_amp is False:
        return "float32"
    if capability is not None:
        return "mixed_float16" if use_amp is True or capability >= (7, 0) else "float32"
    if use_amp is True or has_bf16:
        return "mixed_bfloat16"
    return "float32"


def choose_jit_compile(use_xla, capability, backend="tensorflow"):
    if backend == "jax":  # JAX runs a step only as XLA compiles it (jax.jit); backend.py refuses use_xla=false
        return True
    if use_xla == AUTO:
        return capability is not None
    return bool(use_xla)
