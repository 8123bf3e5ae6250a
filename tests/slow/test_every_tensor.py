"""After a CLI run, every tensor of every export equals the source: non-pruned tensors bit for bit once rounded to the
export dtype, pruned tensors wherever a weight was kept (Wanda keeps values), for tied, untied, Qwen2 (q/k/v biases)
and Qwen3 (q/k norms) checkpoints."""

import json

import pytest
import torch
from safetensors.torch import load_file

from absorbdeploy import exporters
from tests.conftest import run_cli
from tests.helpers import tiny_checkpoint

pytestmark = [pytest.mark.slow, pytest.mark.skipif("vllm" not in exporters.installed(), reason="vllm not installed")]


@pytest.mark.parametrize("architecture, tie", [("llama", True), ("llama", False), ("qwen2", False), ("qwen3", True)])
def test_every_exported_tensor_matches_the_source(architecture, tie, tmp_path):
    def stored(fmt: str) -> dict:
        return {k: v for shard in exporters.get(fmt).tensors(out / fmt) for k, v in shard.items()}

    model = tiny_checkpoint(tmp_path / "model", tie=tie, architecture=architecture)
    source = load_file(str(model / "model.safetensors"))
    out = tmp_path / "out"
    proc = run_cli("prune-and-export", model, "--recipe", "smoke-tiny", "--formats", "vllm,compressed-safetensors",
                   "--out", out)
    assert proc.returncode == 0, proc.stderr[-2000:]
    prunable = set(json.loads((out / "vllm" / "absorbdeploy.json").read_text())["prunable"])
    assert prunable and all(name in source for name in prunable)
    exports = {fmt: stored(fmt) for fmt in ("vllm", "compressed-safetensors")}
    for fmt, tensors in exports.items():
        expected_names = {n for n in source if not (tie and n == "lm_head.weight")}
        assert expected_names <= set(tensors) | ({"lm_head.weight"} if tie else set()), fmt
        for name in expected_names:
            if name not in tensors:
                continue
            got, want = tensors[name], source[name].to(torch.bfloat16)
            assert got.dtype == torch.bfloat16 and got.shape == want.shape, (fmt, name)
            if name in prunable:
                kept = got != 0
                assert torch.equal(got[kept], want[kept]), (fmt, name)
                assert int((~kept).sum()) >= got.numel() // 2, (fmt, name)
            else:
                assert torch.equal(got, want), (fmt, name)
    if architecture == "qwen2":
        assert any(n.endswith("q_proj.bias") for n in exports["vllm"])

