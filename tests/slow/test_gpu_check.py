"""bench/gpu_check.sh's CPU side (its --dry-run): the prepared fixture, the install without dependencies, tests/gpu and
the comparison JSON, with --device cpu; and its refusal on a machine without CUDA."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parent.parent.parent


def test_without_cuda_it_stops_at_once_with_one_line(tmp_path):
    env = {**os.environ, "ABSORBDEPLOY_GPU_CHECK_FIXTURE": str(tmp_path)}
    (tmp_path / "tiny-trained").mkdir()
    (tmp_path / "tiny-trained" / "config.json").write_text("{}")
    proc = subprocess.run(["bash", "bench/gpu_check.sh", "--out", str(tmp_path / "out")], capture_output=True, text=True,
                          cwd=REPO, env=env, timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        "gpu_check: no NVIDIA GPU here (nvidia-smi -L failed); on a CPU machine use --dry-run"]


def test_the_dry_run_writes_the_comparison(tmp_path):
    env = {**os.environ, "ABSORBDEPLOY_GPU_CHECK_FIXTURE": str(tmp_path / "fixture"),
           "ABSORBDEPLOY_GPU_CHECK_CPU": str(tmp_path / "cpu.json"), "PYTHON": sys.executable}
    prepared = subprocess.run([sys.executable, "-m", "bench.gpu_check", "--prepare"], capture_output=True, text=True,
                              cwd=REPO, env=env, timeout=900)
    assert prepared.returncode == 0, prepared.stderr[-2000:]
    out = tmp_path / "out"
    proc = subprocess.run(["bash", "bench/gpu_check.sh", "--dry-run", "--out", str(out)], capture_output=True, text=True,
                          cwd=REPO, env=env, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    result = json.loads((out / "gpu_check.json").read_text())
    assert result["device"] == "cpu" and "skipped" in (out / "pytest.log").read_text()
    for name in ("uniform-wanda-50", "default"):
        run = result["reference"][name]
        assert run["exit_code"] == 0, run
        assert run["masks_vs_cpu"]["identical_matrices"] == run["masks_vs_cpu"]["matrices"] > 0
        assert run["pruned_ppl_vs_cpu"] == pytest.approx(1.0, abs=1e-9)
        assert {"calibrate", "prune", "export", "validate"} <= set(run["stages"])
    assert "onnxruntime_providers" in result["runtimes"] and "vllm_importable" in result["runtimes"]
