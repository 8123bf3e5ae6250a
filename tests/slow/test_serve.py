"""The serve line the CLI prints works: it starts vLLM's OpenAI server on 127.0.0.1, answers one /v1/completions request
with transformers' greedy text for the same checkpoint, and is stopped by the test that started it."""

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

from absorbdeploy import exporters
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


def test_the_printed_serve_command_serves_the_export(tiny_trained_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "run"
    proc = run_cli("prune-and-export", tiny_trained_dir, "--recipe", "smoke-tiny", "--formats", "vllm", "--out", out)
    assert proc.returncode == 0, proc.stderr[-2000:]
    line = next(l for l in proc.stdout.splitlines() if l.startswith("serve:"))
    command = shlex.split(line.removeprefix("serve:"))
    assert command[-1] == f"{out}/vllm"
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
