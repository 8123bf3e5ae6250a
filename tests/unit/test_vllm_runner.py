"""VllmRunner without vLLM: the parent side of the JSON-lines protocol against a stand-in worker (how it is started,
scores and timings decoded, errors and early exits turned into RuntimeErrors with the root cause from the worker's log,
a clean close). The real worker runs in tests/slow/test_vllm.py."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from absorbdeploy import vllm_runner
from absorbdeploy.vllm_runner import VllmRunner

WORKER = r"""
import json, sys
sys.stderr.write("INFO 01-02 10:11:12 [loader.py:1] loading\n")
sys.stderr.flush()
if sys.argv[1] == "dies":
    sys.stderr.write("(EngineCore_DP0 pid=7) ERROR 01-02 10:11:12 [core.py:708] ValueError: no room for the KV cache\n")
    sys.stderr.write("RuntimeError: Engine core initialization failed. See root cause above.\n")
    sys.exit(3)
print(json.dumps({"ready": True, "seconds": 1.5}), flush=True)
for line in sys.stdin:
    request = json.loads(line)
    if request["op"] == "score":
        print(json.dumps({"target_logprobs": [[-t / 100 for t in w[1:]] for w in request["windows"]],
                          "top1": [w[1:] for w in request["windows"]]}), flush=True)
    elif request["op"] == "generate":
        print(json.dumps({"prefill_s": 0.25, "decode_s": 0.5, "tokens": request["prompts"][0][: request["new_tokens"]]}),
              flush=True)
    else:
        sys.stderr.write("(EngineCore_DP0 pid=7) ERROR 01-02 10:11:13 [core.py:9] KeyError: 'op'\n")
        sys.stderr.flush()
        print(json.dumps({"error": "KeyError: 'op'"}), flush=True)
"""


@pytest.fixture()
def start(monkeypatch, tmp_path):
    """VllmRunner(...) with the worker command replaced by WORKER; returns (runner, the command it asked for)."""
    real_popen, asked, runners = subprocess.Popen, {}, []

    def popen(args, **kwargs):
        asked.update(args=args, env=kwargs["env"])
        return real_popen([sys.executable, "-c", WORKER, asked["mode"]], **kwargs)

    monkeypatch.setattr(vllm_runner.subprocess, "Popen", popen)
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)

    def make(mode="serves", **options):
        asked["mode"] = mode
        runner = VllmRunner(tmp_path / "model", "float32", 256, name="vllm + plugin", **options)
        runners.append(runner)
        return runner, asked

    yield make
    for runner in runners:
        runner.close()


def test_the_worker_is_this_module_on_the_resolved_directory(start, tmp_path):
    runner, asked = start()
    assert asked["args"] == [sys.executable, "-m", "absorbdeploy.vllm_runner", str((tmp_path / "model").resolve()),
                             "float32", "256"]
    assert asked["env"]["VLLM_CPU_KVCACHE_SPACE"] == "1" and asked["env"]["VLLM_NO_USAGE_STATS"] == "1"
    assert runner.runtime == "vllm + plugin" and runner.startup_s is None  # started, not yet waited for


def test_a_runner_given_its_kv_cache_size_passes_it_to_the_engine(start, monkeypatch):
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "6")
    _, asked = start()
    assert asked["env"]["VLLM_CPU_KVCACHE_SPACE"] == "6"  # the user's setting wins over the default
    _, asked = start(kv_cache_gib=1)
    assert asked["env"]["VLLM_CPU_KVCACHE_SPACE"] == "1"  # validation's timing engines ask for less


def test_scores_and_timings_come_back_as_tensors(start):
    runner, _ = start()
    ids = torch.tensor([[5, 10, 20, 40], [1, 2, 3, 4]])
    scores = runner.score(ids)
    assert runner.startup_s == 1.5  # the first request waited for the engine
    assert scores.target_logprobs.dtype == torch.float32
    assert torch.allclose(scores.target_logprobs, -ids[:, 1:].float() / 100)
    assert torch.equal(scores.top1, ids[:, 1:])
    timing = runner.generate(ids, 3)
    assert (timing.prefill_s, timing.decode_s, timing.tokens) == (0.25, 0.5, [5, 10, 20])
    assert runner.resident_bytes() > 0


def test_a_worker_error_carries_the_root_cause_from_its_log(start):
    runner, _ = start()
    with pytest.raises(RuntimeError, match=r"^vLLM worker: KeyError: 'op' \(root cause: KeyError: 'op'\)$"):
        runner._ask({"op": "unknown"})


def test_a_worker_that_dies_names_its_exit_code_and_root_cause(start):
    runner, _ = start("dies")
    with pytest.raises(RuntimeError) as died:
        runner.score(torch.tensor([[1, 2]]))
    assert str(died.value) == "vLLM worker exited with code 3 (root cause: ValueError: no room for the KV cache)"


def test_close_ends_the_worker_and_removes_its_log(start):
    runner, _ = start()
    runner.score(torch.tensor([[1, 2]]))
    log = Path(runner.log.name)
    assert log.is_file()
    runner.close()
    assert runner.proc.returncode == 0 and not log.exists()
    runner.close()  # twice is harmless


def test_root_cause_is_the_last_error_line_that_is_not_the_pointer_to_it(tmp_path):
    runner = VllmRunner.__new__(VllmRunner)
    runner.log = type("Log", (), {"name": str(tmp_path / "worker.log")})()
    lines = ["INFO 01-02 10:11:12 [core.py:1] starting",
             "(EngineCore_DP0 pid=7) ERROR 01-02 10:11:12 [core.py:708] TypeError: first",
             "(EngineCore_DP0 pid=7) ERROR 01-02 10:11:12 [core.py:708] torch.OutOfMemoryError: out of memory",
             "RuntimeError: Engine core initialization failed. See root cause above."]
    Path(runner.log.name).write_text("\n".join(lines))
    assert runner._root_cause() == " (root cause: torch.OutOfMemoryError: out of memory)"
    Path(runner.log.name).write_text("INFO all fine\nWARNING nothing wrong\n")
    assert runner._root_cause() == ""

