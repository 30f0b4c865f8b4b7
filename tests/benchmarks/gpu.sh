#!/bin/sh
# The GPU check, in one run on a lent GPU machine (it has PyTorch, JAX and transformers, no
# TensorFlow, and no network): the product's JAX step (jax_gpu.py) and the transformers PyTorch
# reference (torch_gpu.py), same card, same call. keras and keras-hub travel as wheels:
#
#   make gpu-wheels                      # here: build/gpu-wheels (Python 3.12 wheels)
#   device run, carry ["build/gpu-wheels"]: sh tests/benchmarks/gpu.sh
#
# Figures go to $OUT (jax.json, jax512.json, torch.json, jax-cudnn-jit.json, log.txt).
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
# The GPU image's cuDNN (CUDNN_LIB_CONFIG=GRAPH_JIT_ONLY, Dockerfile): the product's step again with
# only the libraries that configuration keeps, from a copy of this machine's nvidia packages (put
# first on the path, so JAX's plugin preloads cuDNN from there); the step must run and match the
# full configuration's speed, and the process must map the copy's libcudnn_graph.
nvidia_dir=$(python3 -c "import nvidia.cudnn, os; print(os.path.dirname(nvidia.cudnn.__path__[0]))")
rm -rf /tmp/cudnn-jit && mkdir -p /tmp/cudnn-jit && cp -r "$nvidia_dir" /tmp/cudnn-jit/nvidia
(cd /tmp/cudnn-jit/nvidia/cudnn/lib && rm -f libcudnn_adv.so.* libcudnn_cnn.so.* libcudnn_ops.so.* \
    libcudnn_ext.so.* libcudnn_heuristic.so.* libcudnn_engines_precompiled.so.*)
ls /tmp/cudnn-jit/nvidia/cudnn/lib | tee -a "$OUT/log.txt"
CUDNN_LIB_CONFIG=GRAPH_JIT_ONLY PYTHONPATH=/tmp/cudnn-jit:code:tests python3 -c "
import jax, jax.numpy as jnp
print(jax.devices(), float(jnp.ones((256, 256)).sum()))
print([l.split()[-1] for l in open('/proc/self/maps') if 'libcudnn' in l and 'r-xp' in l])
" 2>&1 | grep -v "^W0000\|^I0000" | tee -a "$OUT/log.txt"
CUDNN_LIB_CONFIG=GRAPH_JIT_ONLY PYTHONPATH=/tmp/cudnn-jit:code:tests python3 tests/benchmarks/jax_gpu.py \
    --policies mixed_bfloat16 --out "$OUT/jax-cudnn-jit.json" 2>&1 | grep -v "^W0000\|^I0000" | tail -6 \
    | tee -a "$OUT/log.txt"
