"""Streaming mode gives the same pruned weights as the in-memory path and writes complete, loadable exports."""

import json

import pytest
import torch

from absorbdeploy.checkpoint import ShardIndex
from tests.conftest import run_cli

ARGS = ["--recipe", "smoke-tiny", "--formats", "vllm,compressed-safetensors", "--set", "validate.latency.enabled=false",
        "--set", "allocation.method=owl", "--set", "absorption.enabled=true", "--set", "absorption.probe_seqlen=128",
        "--set", "export.max_shard_size=300KB"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from absorbdeploy.tiny import build_tiny_llama

    folder = tmp_path_factory.mktemp("streaming")
    model, tokenizer = build_tiny_llama()
    model.save_pretrained(folder / "model")
    tokenizer.save_pretrained(folder / "model")
    procs = {mode: run_cli("prune-and-export", folder / "model", "--out", folder / mode, *ARGS, "--set", f"streaming.mode={mode}")
             for mode in ("on", "off")}
    return folder, procs


def test_streaming_and_in_memory_give_bit_identical_pruned_weights(runs):
    folder, procs = runs
    for mode, proc in procs.items():
        assert proc.returncode == 0, (mode, proc.stderr[-2000:])
    assert "streaming block by block: streaming.mode: on" in procs["on"].stdout
    on, off = ShardIndex(folder / "on" / "vllm"), ShardIndex(folder / "off" / "vllm")
    assert set(on.map) == set(off.map) and len(set(on.map.values())) > 1  # sharded at 300 KB
    for name in on.map:
        assert torch.equal(on.read([name])[name], off.read([name])[name]), name
    a = json.loads((folder / "on" / "absorption.json").read_text())
    b = json.loads((folder / "off" / "absorption.json").read_text())
    assert a["coefficients"] == b["coefficients"] and a["final"] == b["final"]


def test_streamed_exports_validate(runs):
    folder, _ = runs
    report = json.loads((folder / "on" / "report.json").read_text())
    assert report["streaming"]["enabled"] and report["status"] == "passed"
    assert report["artefacts"]["compressed-safetensors"]["runtime"] == "decoder (tensors vs vllm/)"
    assert report["artefacts"]["vllm"]["top1_agreement"] == 1.0
    assert report["allocation"]["exact"]
    index = json.loads((folder / "on" / "vllm" / "model.safetensors.index.json").read_text())
    assert all((folder / "on" / "vllm" / f).is_file() for f in set(index["weight_map"].values()))



def test_streamed_int8_values_are_compared_as_int8_stores_them(tmp_path):
    """Streaming never holds the model whole: the int8 bitmask export's decoded tensors are compared with the pruned
    checkpoint's weights quantized the same way (exact), and its PPL is reported as not measured, not as the
    unquantized model's."""
    from absorbdeploy.tiny import build_tiny_llama

    model, tokenizer = build_tiny_llama()
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    proc = run_cli("prune-and-export", tmp_path / "model", "--out", tmp_path / "run", "--recipe", "smoke-tiny",
                   "--formats", "vllm,bitmask", "--set", "validate.latency.enabled=false", "--set", "streaming.mode=on",
                   "--set", "export.values=int8")
    assert proc.returncode == 0, proc.stderr[-2000:]
    bitmask = json.loads((tmp_path / "run" / "report.json").read_text())["artefacts"]["bitmask"]
    assert bitmask["runtime"] == "decoder (tensors vs vllm/)" and bitmask["top1_agreement"] == 1.0
    assert bitmask["values"] == "int8" and bitmask["ppl"] is None and bitmask["quantization_ppl_ratio"] is None
