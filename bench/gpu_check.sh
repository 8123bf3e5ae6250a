#!/usr/bin/env bash
# The CUDA path in one prepared call (issue 20). On the GPU machine (the device tool: its image has torch, transformers,
# onnx and onnxruntime, reaches no registry, and takes at most 64 MiB of files):
#   here, once:   .venv/bin/python -m bench.gpu_check --prepare       (tiny trained fixture + CPU reference, ~2 min)
#   device run:   bash bench/gpu_check.sh        with carry [".gpu_check"], timeout_s 540
# It installs absorbdeploy from this checkout without its dependencies (the image brings them), runs tests/gpu, then
# `python -m bench.gpu_check --device cuda`; everything lands in $OUT/gpu_check.json (and $OUT/pytest.log).
# --dry-run runs the same steps on a CPU machine (--device cpu; tests/gpu skip) to test the script itself.
# Exits 2 at once, with one line, on a machine without CUDA (unless --dry-run); leaves no process behind.
set -euo pipefail
cd "$(dirname "$0")/.."
DRY=0
OUT_DIR=${OUT:-/tmp/absorbdeploy-gpu-check}
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --out) OUT_DIR=$2; shift ;;
    *) echo "gpu_check: unknown argument $1 (use --dry-run, --out DIR)" >&2; exit 2 ;;
  esac
  shift
done
mkdir -p "$OUT_DIR"
FIXTURE=${ABSORBDEPLOY_GPU_CHECK_FIXTURE:-.gpu_check}
if [ ! -f "$FIXTURE/tiny-trained/config.json" ]; then
  echo "gpu_check: no fixture in $FIXTURE/: run '.venv/bin/python -m bench.gpu_check --prepare' on the CPU machine and carry .gpu_check" >&2
  exit 2
fi
if [ "$DRY" = 1 ]; then
  PY=${PYTHON:-.venv/bin/python}
  DEVICE=cpu
  EXTRA=(--skip-speed)
else
  if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
    echo "gpu_check: no NVIDIA GPU here (nvidia-smi -L failed); on a CPU machine use --dry-run" >&2
    exit 2
  fi
  PY=${PYTHON:-python3}
  "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" \
    || { echo "gpu_check: torch sees no CUDA device" >&2; exit 2; }
  DEVICE=cuda
  EXTRA=()
fi
# absorbdeploy from this checkout, without its dependencies (no registry needed), into a folder of its own; the source
# tree itself does not import as installed (exporters/ and recipes/ are mapped into the package at install time), so
# nothing may put the checkout first on sys.path: PYTHONSAFEPATH and pytest's append mode.
# Built from a copy (the files the Dockerfile copies), so setuptools' build/ never lands in the checkout.
SITE="$OUT_DIR/site" SRC="$OUT_DIR/src"
rm -rf "$SITE" "$SRC" && mkdir -p "$SRC"
cp -r pyproject.toml README.md absorbdeploy exporters recipes "$SRC/"
"$PY" -m pip install -q --no-deps --no-build-isolation --no-index --target "$SITE" "$SRC" >"$OUT_DIR/install.log" 2>&1 \
  || { tail -5 "$OUT_DIR/install.log" >&2; exit 1; }
rm -rf "$SRC"
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}" PYTHONSAFEPATH=1
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
status=0
timeout 150 "$PY" -m pytest -q -p no:cacheprovider --import-mode=append tests/gpu >"$OUT_DIR/pytest.log" 2>&1 || status=$?
tail -3 "$OUT_DIR/pytest.log"
# the bench package comes from the checkout, appended after $SITE: absorbdeploy still comes from $SITE
PYTHONPATH="$PYTHONPATH:$PWD" timeout 360 "$PY" -m bench.gpu_check --device "$DEVICE" --out "$OUT_DIR" \
  "${EXTRA[@]}" || status=$?
exit "$status"
