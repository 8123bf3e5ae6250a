"""The serve line the CLI prints (serve.command) works: it starts vLLM's OpenAI server on 127.0.0.1, answers one
/v1/completions request with transformers' greedy text for the same checkpoint, and is stopped by the test that started
it."""

import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch

from absorbdeploy import exporters, serve
from tests.conftest import run_cli

pytestmark = [pytest.mark.slow, pytest.mark.skipif("vllm" not in exporters.installed(), reason="vllm not installed")]

PROMPT = "The for statement in Python"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(url: str, payload: dict) -> dict:
    request = urllib.request.Request(url, json.dumps(payload).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as answer:
        return json.loads(answer.read())


def _wait_healthy(url: str, server: subprocess.Popen, seconds: int = 240) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert server.poll() is None, f"the server exited with code {server.returncode}"
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(1)
    raise AssertionError("the server did not become healthy")


@pytest.fixture(scope="module")
def exported(tiny_trained_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("serve") / "run"
    proc = run_cli("prune-and-export", tiny_trained_dir, "--recipe", "smoke-tiny", "--formats", "vllm,bitmask", "--out", out)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return out, proc.stdout


@pytest.mark.parametrize("fmt", ["vllm", "bitmask"])
def test_the_printed_serve_command_serves_the_export(exported, fmt, tmp_path):
    """vllm/ is the dense checkpoint; bitmask/ runs through the absorbdeploy plugin on the sparse kernel. Both must
    answer with transformers' greedy text for the pruned model (the vllm/ checkpoint)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, stdout = exported
    line = next(l for l in stdout.splitlines() if l.startswith("serve:") and l.endswith(f"/{fmt}"))
    assert line.removeprefix("serve:").strip() == serve.command(f"{out}/{fmt}")  # the CLI prints serve's command
    command = shlex.split(line.removeprefix("serve:"))
    assert command[-1] == f"{out}/{fmt}"
    command[0] = str(Path(sys.executable).parent / command[0])  # the console script of this environment
    port = _free_port()
    log = open(tmp_path / "server.log", "w")
    server = subprocess.Popen([*command, "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32",
                               "--max-model-len", "256", "--served-model-name", "pruned"],
                              stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                              env={**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"})
    try:
        _wait_healthy(f"http://127.0.0.1:{port}/health", server)
        answer = _post(f"http://127.0.0.1:{port}/v1/completions",
                       {"model": "pruned", "prompt": PROMPT, "max_tokens": 16, "temperature": 0})
    finally:
        os.killpg(server.pid, signal.SIGINT)
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
        log.close()
    assert server.returncode is not None
    tokenizer = AutoTokenizer.from_pretrained(out / "vllm")
    model = AutoModelForCausalLM.from_pretrained(out / "vllm", dtype=torch.float32)
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    greedy = model.generate(ids, max_new_tokens=16, do_sample=False)[0, ids.shape[1]:]
    assert answer["choices"][0]["text"] == tokenizer.decode(greedy, skip_special_tokens=True)


TP_CODE = """
import json, sys
if __name__ == "__main__":
    from vllm import LLM, SamplingParams
    llm = LLM(model=sys.argv[1], dtype="float32", max_model_len=256, enforce_eager=True, seed=0,
              tensor_parallel_size=int(sys.argv[2]))
    params = SamplingParams(max_tokens=16, temperature=0, logprobs=1)
    out = llm.generate([{"prompt_token_ids": list(range(60, 90))}], params, use_tqdm=False)[0].outputs[0]
    print("RESULT " + json.dumps({"tokens": list(out.token_ids),
                                  "logprobs": [lp[t].logprob for lp, t in zip(out.logprobs, out.token_ids)]}))
"""


def test_tensor_parallel_shards_of_the_packed_layers_give_the_same_tokens(exported, tmp_path):
    """--tensor-parallel-size 2 on this CPU: column-parallel layers take a range of packed rows, row-parallel ones cut
    every row's bitmask and values at the shard boundary (bitmask.slice_*); greedy tokens and log-probs equal TP 1's."""
    out, _ = exported
    script = tmp_path / "tp.py"
    script.write_text(TP_CODE)
    results = {}
    for tp in (1, 2):
        env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "0|1" if tp == 2 else "auto"}
        proc = subprocess.run([sys.executable, str(script), str(out / "bitmask"), str(tp)], capture_output=True, text=True,
                              timeout=600, env=env)
        line = next((l for l in proc.stdout.splitlines() if l.startswith("RESULT ")), None)
        assert line is not None, proc.stderr[-3000:]
        results[tp] = json.loads(line.removeprefix("RESULT "))
    assert results[2]["tokens"] == results[1]["tokens"]
    assert max(abs(a - b) for a, b in zip(results[1]["logprobs"], results[2]["logprobs"])) < 1e-3
