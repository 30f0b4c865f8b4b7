# review-trainer: a SageMaker training image that fine-tunes a DistilBERT star-rating classifier.
#
#   docker build --target gpu -t review-trainer:gpu .     # the default target: TensorFlow's CUDA build
#   docker build --target cpu -t review-trainer:cpu .     # tensorflow-cpu, no CUDA
#   docker run --rm -v "$PWD/opt_ml:/opt/ml" review-trainer:cpu train
#
# Everything a job needs is baked in (weights, Python packages): jobs run with network isolation.
# BASE_IMAGE lets a machine without a registry build from a local Debian bookworm image.
# The GPU target takes the CUDA runtime from TensorFlow's `and-cuda` wheels (nvidia-*): the host
# brings only the driver, so both targets share the same Debian base.

ARG BASE_IMAGE=debian:bookworm-slim

FROM ${BASE_IMAGE} AS python
# Pinned to bookworm's current versions; bump them together with `apt-cache policy python3.11`.
RUN apt-get update \
    && apt-get install -y --no-install-recommends \
        ca-certificates=20230311+deb12u1 \
        python3.11=3.11.2-6+deb12u8 \
        python3.11-venv=3.11.2-6+deb12u8 \
    && rm -rf /var/lib/apt/lists/*
ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1

# Python packages, from lock files with hashes. A few come as source only (sagemaker-training
# compiles a C extension): the compiler stays in these build stages. TensorFlow's C++ headers
# (290 MB) serve only to compile custom ops, which a training job never does. PIP_CERT: a CA bundle for
# builds behind an intercepting proxy (mount it and pass its path); unset otherwise.
FROM python AS compilers
RUN apt-get update \
    && apt-get install -y --no-install-recommends \
        gcc=4:12.2.0-3 \
        python3.11-dev=3.11.2-6+deb12u8 \
    && rm -rf /var/lib/apt/lists/*

FROM compilers AS packages-cpu
ARG PIP_CERT
COPY docker/requirements.lock docker/requirements-nodeps.lock /tmp/locks/
RUN python3.11 -m venv /opt/venv \
    && pip install --require-hashes -r /tmp/locks/requirements.lock \
    && pip install --require-hashes --no-deps -r /tmp/locks/requirements-nodeps.lock \
    && rm -rf /opt/venv/lib/python3.11/site-packages/tensorflow/include

FROM compilers AS packages-gpu
ARG PIP_CERT
COPY docker/requirements-gpu.lock docker/requirements-nodeps.lock /tmp/locks/
RUN python3.11 -m venv /opt/venv \
    && pip install --require-hashes -r /tmp/locks/requirements-gpu.lock \
    && pip install --require-hashes --no-deps -r /tmp/locks/requirements-nodeps.lock \
    && rm -rf /opt/venv/lib/python3.11/site-packages/tensorflow/include

# Pretrained weights: from the Hugging Face hub (model id at a pinned revision, files checked
# against docker/weights/<id>/<revision>.sha256) or from a folder under docker/weights/ in the
# build context (PRETRAINED_SOURCE=local, PRETRAINED_LOCAL_DIR relative to docker/weights/).
FROM python AS weights
ARG PRETRAINED_SOURCE=hub
ARG PRETRAINED_MODEL_ID=distilbert-base-uncased
ARG PRETRAINED_REVISION=12040accade4e8a0f71eabdb258fecc2e7e948be
ARG PRETRAINED_LOCAL_DIR=local
ARG PIP_CERT
COPY docker/fetch_weights.py /tmp/fetch_weights.py
COPY docker/weights/ /tmp/weights/
RUN python3.11 /tmp/fetch_weights.py --source "${PRETRAINED_SOURCE}" --model-id "${PRETRAINED_MODEL_ID}" \
        --revision "${PRETRAINED_REVISION}" --local-dir "/tmp/weights/${PRETRAINED_LOCAL_DIR}" \
        --sums-dir /tmp/weights --output /opt/pretrained

FROM python AS trainer
ARG VERSION=0.1.0
ARG REVISION=unknown
ARG SOURCE=https://github.com/review-trainer/review-trainer
LABEL org.opencontainers.image.title="review-trainer" \
      org.opencontainers.image.description="SageMaker training image: fine-tunes a DistilBERT star-rating classifier" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.source="${SOURCE}" \
      com.amazonaws.sagemaker.capabilities.accept-bind-to-port="false"
# Nothing may try the network at run time: jobs run with EnableNetworkIsolation=true.
ENV PYTHONUNBUFFERED=1 \
    PRETRAINED_MODEL_DIR=/opt/pretrained \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    HF_DATASETS_OFFLINE=1 \
    TF_CPP_MIN_LOG_LEVEL=1 \
    IMAGE_VERSION=${VERSION}
COPY --from=weights /opt/pretrained /opt/pretrained
RUN mkdir -p /opt/ml/input/config /opt/ml/input/data /opt/ml/model /opt/ml/output/data /opt/ml/checkpoints /opt/ml/code
WORKDIR /opt/ml

# `docker run IMAGE train` runs /opt/venv/bin/train as PID 1: no shell or wrapper in between,
# so SIGTERM from a spot interruption or StopTrainingJob reaches the trainer.
FROM trainer AS cpu
COPY --from=packages-cpu /opt/venv /opt/venv
COPY code /tmp/code
RUN pip install --no-deps --no-build-isolation /tmp/code && rm -rf /tmp/code
CMD ["train"]

FROM trainer AS gpu
COPY --from=packages-gpu /opt/venv /opt/venv
COPY code /tmp/code
RUN pip install --no-deps --no-build-isolation /tmp/code && rm -rf /tmp/code
CMD ["train"]
