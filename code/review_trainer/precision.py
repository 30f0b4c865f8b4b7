"""Mixed precision and XLA for `use_amp` / `use_xla` = auto, chosen per device from measurements.

Measured with benchmarks/precision.py (fine-tuning all-MiniLM-L6-v2, batch 32, 64 tokens):
- CPU with AVX512-BF16/AMX: `mixed_bfloat16` without XLA was fastest; XLA did not help and
  float16 was slower. CPUs without bf16 instructions keep float32.
- GPU: bfloat16 where the card has bf16 tensor cores (compute capability 8.0+: A100, L4, H100),
  float16 with loss scaling on older cards (V100, T4), and XLA on.
"""

import tensorflow as tf

from review_trainer.hyperparameters import AUTO


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
        return "mixed_bfloat16" if capability >= (8, 0) else "mixed_float16"
    if use_amp is True or has_bf16:
        return "mixed_bfloat16"
    return "float32"


def choose_jit_compile(use_xla, capability):
    if use_xla == AUTO:
        return capability is not None
    return bool(use_xla)
