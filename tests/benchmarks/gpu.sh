#!/bin/sh
# The GPU check, in one run on a lent GPU machine (it has PyTorch, JAX and transformers, no
# TensorFlow, and no network): the product's JAX step (jax_gpu.py) and the transformers PyTorch
# reference (torch_gpu.py), same card, same call. keras and keras-hub travel as wheels:
#
#   make gpu-wheels                      # here: build/gpu-wheels (Python 3.12 wheels)
#   device run, carry ["build/gpu-wheels"]: sh tests/benchmarks/gpu.sh
#
# Figures go to $OUT (jax.json, torch.json, log.txt).
set -eu
OUT=${OUT:-/tmp/gpu-out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/log.txt"
python3 -m pip install --quiet --no-index --find-links build/gpu-wheels --no-deps build/gpu-wheels/*.whl
export KERAS_BACKEND=jax PYTHONPATH=code:tests XLA_PYTHON_CLIENT_PREALLOCATE=true
python3 tests/benchmarks/jax_gpu.py --out "$OUT/jax.json" 2>&1 | grep -v "^W0000\|^I0000" | tee -a "$OUT/log.txt"
python3 tests/benchmarks/jax_gpu.py --batch-size 512 --policies mixed_bfloat16 --out "$OUT/jax512.json" 2>&1 \
    | grep -v "^W0000\|^I0000" | tail -4 | tee -a "$OUT/log.txt"
python3 tests/benchmarks/torch_gpu.py --out "$OUT/torch.json" 2>&1 | tee -a "$OUT/log.txt"
