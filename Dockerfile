# review-trainer: a SageMaker training image that fine-tunes a DistilBERT star-rating classifier.
#
#   docker build --target gpu -t review-trainer:gpu .        # the default target: TensorFlow and JAX on CUDA
#   docker build --target cpu -t review-trainer:cpu .        # tensorflow-cpu and JAX, no CUDA
#   docker build --target neuron -t review-trainer:neuron .  # AWS Trainium: JAX on Neuron (untested here)
#   docker run --rm -v "$PWD/opt_ml:/opt/ml" review-trainer:cpu train
#
# Everything a job needs is baked in (weights, Python packages): jobs run with network isolation.
# BASE_IMAGE lets a machine without a registry build from a local Debian bookworm image.
# The GPU target takes the CUDA runtime from the nvidia-* wheels that TensorFlow's `and-cuda` and
# JAX's CUDA plugin share: the host brings only the driver, so the cpu and gpu targets share the
# same Debian base. The neuron target starts from AWS's Neuron JAX training image instead
# (NEURON_BASE_IMAGE), which brings the Neuron runtime, compiler and JAX.

ARG BASE_IMAGE=debian:bookworm-slim
# The newest Neuron JAX training image that AWS lists (github.com/aws-neuron/deep-learning-containers,
# jax-training-neuronx): Ubuntu 24.04, Python 3.13, JAX 0.10.0 with jax-neuronx, Neuron SDK 2.32.0.
# docker/requirements-neuron.lock is resolved for its Python 3.13.
ARG NEURON_BASE_IMAGE=public.ecr.aws/neuron/jax-training-neuronx:0.10.0-neuronx-py313-sdk2.32.0-ubuntu24.04

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

# TensorFlow's and jaxlib's shared libraries ship with their full symbol tables: `strip
# --strip-unneeded` keeps the dynamic symbols that loading and linking use (0.36 GB less here;
# only the function names in a native crash's stack trace go).
FROM compilers AS packages-cpu
ARG PIP_CERT
COPY docker/requirements.lock docker/requirements-nodeps.lock /tmp/locks/
RUN python3.11 -m venv /opt/venv \
    && pip install --require-hashes -r /tmp/locks/requirements.lock \
    && pip install --require-hashes --no-deps -r /tmp/locks/requirements-nodeps.lock \
    && site=/opt/venv/lib/python3.11/site-packages \
    && rm -rf "$site/tensorflow/include" \
    && find "$site/tensorflow" "$site/jaxlib" -name '*.so*' -type f -exec strip --strip-unneeded {} +

# The GPU packages: TensorFlow and JAX's CUDA plugin on one set of CUDA 12 wheels (nvidia-*; see
# docker/requirements-gpu.in, which also says why curand, nvshmem and cccl are not in the lock).
# Both load their CUDA libraries with dlopen by name (from the nvidia/*/lib folders on their
# RUNPATH), so what neither names is removed here; `strings` and `readelf -d` over TensorFlow's,
# jaxlib's, the plugin's and cuDNN's libraries find no reference to any of it (README, "The image"):
# - headers (nvidia/*/include) and the CUDA runtime's static libraries (*.a): for compiling CUDA
#   code, which a training job never does;
# - libcusolverMg: cuSOLVER's multi-GPU API; TensorFlow and XLA call libcusolver.so.11 only;
# - libnvrtc.alt and libnvrtc-builtins.alt: a second build of NVRTC; cuDNN, its only user here,
#   loads libnvrtc.so.12;
# - libnvblas (a shim that sends CPU BLAS calls to the GPU) and libcufftw (cuFFT's FFTW interface);
# - nvvm/lib64/libnvvm.so: XLA (in TensorFlow and in JAX) compiles to PTX with its own LLVM and
#   needs only nvvm/libdevice and bin/ptxas from the CUDA compiler wheel, which stay;
# - clang/ (the libclang wheel, 62 MB): TensorFlow declares it, but no module in the image imports it;
# - cuDNN's legacy API and precompiled kernels (0.95 GB): with CUDNN_LIB_CONFIG=GRAPH_JIT_ONLY,
#   NVIDIA's documented reduced configuration, cuDNN needs only libcudnn, libcudnn_graph and its
#   runtime-compiled engines. Neither model calls anything else: they have no convolution, Keras's
#   attention takes its einsum path (the checkpoints' attention dropout), XLA's cuDNN GEMM fusions
#   are off by default, and the bilstm head's LSTM then avoids cuDNN's RNN kernel on both backends
#   (model/classifier.py). XLA's cuDNN start-up needs only the graph library (cudnnCreate, cudnnGetProperty).
#   NVIDIA supports this configuration from Ampere on. --build-arg CUDNN_LIB_CONFIG=FULL keeps all.
# TensorFlow's and JAX's own shared libraries ship with their full symbol tables (about 0.5 GB):
# `strip --strip-unneeded` keeps the dynamic symbols that loading and linking use, so only the
# function names in a native crash's stack trace go. NVIDIA's binaries are left as shipped.
FROM compilers AS packages-gpu
ARG PIP_CERT
ARG CUDNN_LIB_CONFIG=GRAPH_JIT_ONLY
COPY docker/requirements-gpu.lock docker/requirements-nodeps.lock /tmp/locks/
RUN python3.11 -m venv /opt/venv \
    && pip install --require-hashes -r /tmp/locks/requirements-gpu.lock \
    && pip install --require-hashes --no-deps -r /tmp/locks/requirements-nodeps.lock \
    && site=/opt/venv/lib/python3.11/site-packages \
    && rm -rf "$site/tensorflow/include" "$site"/nvidia/*/include "$site"/nvidia/cuda_runtime/lib/*.a \
        "$site"/nvidia/cusolver/lib/libcusolverMg.so.* \
        "$site"/nvidia/cuda_nvrtc/lib/libnvrtc.alt.so.* "$site"/nvidia/cuda_nvrtc/lib/libnvrtc-builtins.alt.so.* \
        "$site"/nvidia/cublas/lib/libnvblas.so.* "$site"/nvidia/cufft/lib/libcufftw.so.* \
        "$site/nvidia/cuda_nvcc/nvvm/lib64" "$site/clang" \
    && if [ "$CUDNN_LIB_CONFIG" = GRAPH_JIT_ONLY ]; then \
        rm "$site"/nvidia/cudnn/lib/libcudnn_adv.so.9 "$site"/nvidia/cudnn/lib/libcudnn_cnn.so.9 \
            "$site"/nvidia/cudnn/lib/libcudnn_ops.so.9 "$site"/nvidia/cudnn/lib/libcudnn_ext.so.9 \
            "$site"/nvidia/cudnn/lib/libcudnn_heuristic.so.9 "$site"/nvidia/cudnn/lib/libcudnn_engines_precompiled.so.9; \
    fi \
    && find "$site/tensorflow" "$site/jaxlib" "$site/jax_plugins" "$site/jax_cuda12_plugin" \
        -name '*.so*' -type f -exec strip --strip-unneeded {} +

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
ARG CUDNN_LIB_CONFIG=GRAPH_JIT_ONLY
# Read by cuDNN (which sub-libraries to expect) and by the model (the LSTM's cuDNN kernel needs FULL).
ENV CUDNN_LIB_CONFIG=${CUDNN_LIB_CONFIG}
COPY --from=packages-gpu /opt/venv /opt/venv
COPY code /tmp/code
RUN pip install --no-deps --no-build-isolation /tmp/code && rm -rf /tmp/code
CMD ["train"]

# AWS Trainium and Inferentia2: training runs through JAX on the Neuron PJRT plugin (the trainer's
# backend=auto picks JAX where neuron-ls finds NeuronCores: sagemaker-training's num_neurons). Untested here: neither the base image nor
# the Neuron package index is reachable from this project's machines (README, "The image").
# The base image's Python packages stay as they are: its jax, jaxlib, jax-neuronx, libneuronxla and
# neuronx-cc are a set that AWS tests together. A virtual environment with the system site-packages
# adds the trainer, keras, keras-hub, tensorflow-cpu (tf.data and the SavedModel export) and the rest
# of docker/requirements-neuron.lock (Python 3.13, hashed, without jax/jaxlib), less every package the
# base already has (docker/without_installed.py). The build fails if that leaves any requirement of
# any installed package unmet that the base image did not already have (`pip check`, before and
# after; keras-hub's tensorflow-text is left out on purpose, see requirements-nodeps.in), and if the
# trainer's imports fail.
FROM ${NEURON_BASE_IMAGE} AS neuron
ARG VERSION=0.1.0
ARG REVISION=unknown
ARG SOURCE=https://github.com/review-trainer/review-trainer
ARG PIP_CERT
LABEL org.opencontainers.image.title="review-trainer" \
      org.opencontainers.image.description="SageMaker training image: fine-tunes a DistilBERT star-rating classifier (AWS Neuron, JAX)" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.source="${SOURCE}" \
      com.amazonaws.sagemaker.capabilities.accept-bind-to-port="false"
# The same run-time settings as the other targets (`trainer` above); the base image's own PATH and
# LD_LIBRARY_PATH (Neuron runtime, EFA, Open MPI) stay behind the virtual environment.
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    PRETRAINED_MODEL_DIR=/opt/pretrained \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    HF_DATASETS_OFFLINE=1 \
    TF_CPP_MIN_LOG_LEVEL=1 \
    IMAGE_VERSION=${VERSION}
COPY --from=weights /opt/pretrained /opt/pretrained
COPY docker/requirements-neuron.lock docker/requirements-nodeps.lock docker/without_installed.py /tmp/locks/
COPY code /tmp/code
RUN python3.13 -m venv --system-site-packages /opt/venv \
    && { pip check > /tmp/locks/check-base.txt || true; } \
    && python /tmp/locks/without_installed.py /tmp/locks/requirements-neuron.lock \
        /tmp/locks/requirements-nodeps.lock > /tmp/locks/missing.lock \
    && pip install --require-hashes --no-deps -r /tmp/locks/missing.lock \
    && pip install --no-deps --no-build-isolation /tmp/code \
    && { pip check > /tmp/locks/check.txt || true; } \
    && if grep -vF -e "No broken requirements found." -e "requires tensorflow-text, which is not installed." \
        -f /tmp/locks/check-base.txt /tmp/locks/check.txt; then \
        echo "the packages above lost a requirement: relock docker/requirements-neuron.lock against this base" >&2; \
        exit 1; \
    fi \
    && KERAS_BACKEND=jax python -c "import jax, keras, keras_hub, tensorflow, review_trainer.job" \
    && rm -rf /tmp/locks /tmp/code \
    && mkdir -p /opt/ml/input/config /opt/ml/input/data /opt/ml/model /opt/ml/output/data /opt/ml/checkpoints /opt/ml/code
WORKDIR /opt/ml
# The base image starts every command through a bash script (start_with_right_hostname.sh, which
# compiles a gethostname() shim for MPI) and checks the health of a server on port 8080: a training
# job has neither use, and `docker run IMAGE train` must run the trainer as PID 1 so that SIGTERM
# reaches it.
ENTRYPOINT []
HEALTHCHECK NONE
CMD ["train"]
