"""Interrupted runs leave nothing half-written: a run killed with SIGINT or SIGKILL during calibration, pruning or the
exports leaves no DIR/; SIGINT also removes DIR.tmp; after SIGKILL the next run names and removes the stale DIR.tmp."""

import os
import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import run_cli

COMMON = ["prune-and-export", "builtin:tiny-llama", "--recipe", "smoke-tiny", "--formats", "onnx,compressed-safetensors",
          "--set", "allocation.method=owl", "--set", "validate.latency.enabled=false"]
ARGS = COMMON + ["--set", "calibration.nsamples=64", "--set", "calibration.seqlen=512"]
STAGE_LINE = {"calibrate": "[3/9] calibrate", "prune": "[6/9] prune", "export": "[7/9] export"}


def start(out):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "absorbdeploy", *ARGS, "--out", str(out)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)


@pytest.mark.parametrize("stage", list(STAGE_LINE))
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL], ids=["SIGINT", "SIGKILL"])
def test_interrupted_run_leaves_no_output_directory(stage, sig, tmp_path):
    out = tmp_path / "run"
    proc = start(out)
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if line.startswith(STAGE_LINE[stage]):
            break
    assert seen and seen[-1].startswith(STAGE_LINE[stage]), "".join(seen)
    time.sleep(0.5)
    proc.send_signal(sig)
    proc.wait(timeout=120)
    stderr = proc.stderr.read()
    assert not out.exists(), f"{stage}/{sig.name}: a partial DIR/ was left"
    if sig == signal.SIGINT:
        assert proc.returncode == 130 and "interrupted" in stderr and "Traceback" not in stderr
        assert not (tmp_path / "run.tmp").exists()
    else:
        assert proc.returncode == -signal.SIGKILL and (tmp_path / "run.tmp").is_dir()
        rerun = run_cli(*COMMON, "--out", out, "--set", "calibration.nsamples=8", "--set", "calibration.seqlen=128")
        assert rerun.returncode == 0, rerun.stderr[-2000:]
        assert f"removed {tmp_path / 'run.tmp'} left behind by an interrupted run" in rerun.stdout
        assert (out / "report.json").is_file() and not (tmp_path / "run.tmp").exists()


def test_an_interrupt_swallowed_by_a_library_still_blocks_the_rename(tmp_path, monkeypatch):
    """Ctrl-C that some library caught and ignored: the finished-looking run must not become DIR/."""
    from absorbdeploy import atomic

    monkeypatch.setattr(atomic, "_interrupted", True)
    with pytest.raises(KeyboardInterrupt):
        with atomic.Staging(tmp_path / "run", overwrite=False) as staging:
            (staging.path / "report.json").write_text("{}")
            staging.commit()
    assert not (tmp_path / "run").exists() and not (tmp_path / "run.tmp").exists()
