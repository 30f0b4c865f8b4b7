#!/bin/sh
# The GPU check, in one run on a lent GPU machine (it has PyTorch, JAX and transformers, no
# TensorFlow, and no network): the product's JAX step (jax_gpu.py) and the transformers PyTorch
# reference (torch_gpu.py), same card, same call. keras and keras-hub travel as wheels:
#
#   make gpu-wheels                      # here: build/gpu-wheels (Python 3.12 wheels)
#   device run, carry ["build/gpu-wheels"]: sh tests/benchmarks/gpu.sh
#
# Figures go to $OUT (jax.json, jax512.json, torch.json, jax-bilstm.json, jax-cudnn-jit-{cls,bilstm}.json,
# log.txt).
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
# only the libraries that configuration keeps, from a copy of this machine's nvidia packages put
# first on the path (JAX's plugin preloads libcudnn.so.9 from there), for both heads (bilstm: the
# LSTM then avoids cuDNN, model/classifier.py), beside bilstm with the full cuDNN (JAX's cuDNN LSTM). Then the
# runs' own records must show every mapped libcudnn file in the copy and none of the removed ones.
nvidia_dir=$(python3 -c "import nvidia.cudnn, os; print(os.path.dirname(nvidia.cudnn.__path__[0]))")
rm -rf /tmp/cudnn-jit && mkdir -p /tmp/cudnn-jit && cp -r "$nvidia_dir" /tmp/cudnn-jit/nvidia
REMOVED="libcudnn_adv libcudnn_cnn libcudnn_ops libcudnn_ext libcudnn_heuristic libcudnn_engines_precompiled"
for lib in $REMOVED; do rm -f /tmp/cudnn-jit/nvidia/cudnn/lib/"$lib".so.*; done
find /tmp/cudnn-jit/nvidia/cudnn/lib -type f -printf "%f\n" | sort | tee -a "$OUT/log.txt"
python3 tests/benchmarks/jax_gpu.py --head bilstm --steps 20 --policies mixed_bfloat16 --out "$OUT/jax-bilstm.json" \
    2>&1 | grep -v "^W0000\|^I0000" | tail -3 | tee -a "$OUT/log.txt"
for head in cls bilstm; do
    CUDNN_LIB_CONFIG=GRAPH_JIT_ONLY PYTHONPATH=/tmp/cudnn-jit:code:tests python3 tests/benchmarks/jax_gpu.py \
        --head $head --steps 20 --policies mixed_bfloat16 --out "$OUT/jax-cudnn-jit-$head.json" 2>&1 \
        | grep -v "^W0000\|^I0000" | tail -4 | tee -a "$OUT/log.txt"
done
# (sh has no pipefail: a run that failed wrote no json, which this check reports)
python3 - "$OUT" "$REMOVED" <<'CHECK' 2>&1 | tee -a "$OUT/log.txt"
import json, os, sys
out, removed = sys.argv[1], sys.argv[2].split()
for head in ("cls", "bilstm"):
    path = os.path.join(out, f"jax-cudnn-jit-{head}.json")
    if not os.path.exists(path):
        print(f"reduced cuDNN, {head}: FAILED (no {path})")
        continue
    mapped = json.load(open(path))["cudnn_libraries"]
    outside = [m for m in mapped if not m.startswith("/tmp/cudnn-jit/")]
    loaded_removed = [m for m in mapped if any(os.path.basename(m).startswith(r + ".") for r in removed)]
    ok = mapped and not outside and not loaded_removed
    print(f"reduced cuDNN, {head}: {'ok' if ok else 'FAILED'}; mapped {mapped}")
CHECK
