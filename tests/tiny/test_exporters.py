"""Every format in FORMATS: export the pruned tiny model, reload it in its runtime, compare with the in-memory model."""

import dataclasses
import json

import pytest
import torch

from absorbdeploy import exporters
from absorbdeploy.blocks import prunable_names
from absorbdeploy.load import round_weights
from absorbdeploy.recipe import Export, OnnxOptions
from absorbdeploy.runners import TorchRunner
from tests.helpers import prune_in_memory

INSTALLED = [f for f in exporters.FORMATS if not exporters.missing_modules(f)]
RUNTIME_FORMATS = [f for f in INSTALLED if f != "vllm"]  # vLLM's round trip lives in tests/slow (engine start ~30 s)


def pruned_tiny(dtype: str, structure: str = "unstructured"):
    from absorbdeploy.tiny import build_tiny_llama

    model, tokenizer = build_tiny_llama()
    prune_in_memory(model, 0.5, "wanda", structure)
    round_weights(model, dtype)
    names = prunable_names(model, model.model.layers)
    nm = (2, 4) if structure == "2:4" else None
    def spec_of(fmt: str, **onnx_options):
        export = Export(dtype=dtype, onnx=dataclasses.replace(OnnxOptions(), **onnx_options))
        return exporters.spec_for(fmt, export, names, nm, {"test": True})

    return model, tokenizer, spec_of


IDS = torch.randint(0, 256, (2, 48), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("fmt", RUNTIME_FORMATS)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_round_trip_in_own_runtime(fmt, dtype, tmp_path):
    if dtype not in exporters.FORMATS[fmt].dtypes:
        pytest.skip(f"{fmt} stores no {dtype} weights (preflight refuses or leaves it out)")
    model, tokenizer, spec = pruned_tiny(dtype)
    module = exporters.get(fmt)
    artefact = module.export(model, tokenizer, tmp_path / fmt, spec(fmt))
    assert artefact.bytes > 0
    expected = TorchRunner(model).logits(IDS)
    with module.load(artefact.path, exporters.RuntimeOptions()) as runner:
        got = runner.logits(IDS)
    assert (got - expected).abs().max() <= 1e-4  # weights hold the export dtype's values; compute is fp32 in both
    described = module.describe(artefact.path)
    total = sum(p.numel() for n, p in model.named_parameters() if n in spec(fmt).prunable)
    assert described["audit"]["zeros"] == round(0.5 * total)


def test_vllm_directory_reloads_bit_exactly_in_transformers(tmp_path):
    from transformers import AutoModelForCausalLM

    model, tokenizer, spec = pruned_tiny("bfloat16")
    exporters.get("vllm").export(model, tokenizer, tmp_path / "v", spec("vllm"))
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "v", dtype=torch.float32)
    assert torch.equal(TorchRunner(reloaded).logits(IDS), TorchRunner(model).logits(IDS))
    config = json.loads((tmp_path / "v" / "config.json").read_text())
    assert "sparsity_config" not in json.dumps(config) and config["dtype"] == "bfloat16"


def test_two_four_export_uses_the_24_layout(tmp_path):
    model, tokenizer, spec = pruned_tiny("bfloat16", "2:4")
    module = exporters.get("compressed-safetensors")
    module.export(model, tokenizer, tmp_path / "c", spec("compressed-safetensors"))
    config = json.loads((tmp_path / "c" / "config.json").read_text())
    assert config["quantization_config"]["sparsity_config"]["format"] == "sparse-24-bitmask"
    assert module.describe(tmp_path / "c")["audit"]["nm_valid"] is True


@pytest.mark.skipif("onnx" not in INSTALLED, reason="onnx extra not installed")
def test_onnx_sparse_storage_flips_at_the_break_even(tmp_path):
    import onnx

    from absorbdeploy.exporters.onnx import sparse_is_smaller

    assert sparse_is_smaller(1000, 333, 4) and not sparse_is_smaller(1000, 334, 4)  # 66.7 % in fp32
    assert sparse_is_smaller(1000, 199, 2) and not sparse_is_smaller(1000, 200, 2)  # 80 % in fp16
    model, tokenizer, spec = pruned_tiny("float32")
    module = exporters.get("onnx")
    for policy, expected in [("auto", 0), ("always", 28), ("never", 0)]:
        out = tmp_path / policy
        module.export(model, tokenizer, out, spec("onnx", sparse=policy))
        proto = onnx.load(str(out / "model.onnx"))
        sparse = [n for n in proto.graph.node if n.op_type == "Constant" and n.attribute[0].name == "sparse_value"]
        assert len(sparse) == expected, policy
        onnx.checker.check_model(proto, full_check=True)
    assert (tmp_path / "always" / "model.onnx").stat().st_size > (tmp_path / "never" / "model.onnx").stat().st_size


@pytest.mark.skipif("onnx" not in INSTALLED, reason="onnx extra not installed")
def test_onnx_kv_cache_pair_decodes_like_torch(tmp_path):
    model, tokenizer, spec = pruned_tiny("float32")
    module = exporters.get("onnx")
    artefact = module.export(model, tokenizer, tmp_path / "o", spec("onnx", kv_cache=True))
    assert (tmp_path / "o" / "kv" / "decode.onnx").is_file() and any("KV-cache" in n for n in artefact.notes)
    prompt = IDS[:1, :20]
    expected = TorchRunner(model).generate(prompt, 6).tokens
    with module.load(artefact.path, exporters.RuntimeOptions()) as runner:
        timing = runner.generate(prompt, 6)
    assert timing.decode_s is not None and timing.tokens == expected


@pytest.mark.skipif("onnx" not in INSTALLED, reason="onnx extra not installed")
def test_onnx_external_data_path_reloads(tmp_path, monkeypatch):
    """Large models put dense weights in model.onnx.data; force that path on the tiny model and reload it."""
    import onnx

    module = exporters.get("onnx")
    monkeypatch.setattr(module, "EXTERNAL_DATA_ABOVE", 0)
    model, tokenizer, spec = pruned_tiny("float32")
    artefact = module.export(model, tokenizer, tmp_path / "o", spec("onnx"))
    assert "model.onnx.data" in artefact.files and artefact.files["model.onnx.data"] > artefact.files["model.onnx"]
    onnx.checker.check_model(str(tmp_path / "o" / "model.onnx"))
    with module.load(artefact.path, exporters.RuntimeOptions()) as runner:
        assert (runner.logits(IDS) - TorchRunner(model).logits(IDS)).abs().max() <= 1e-4
    assert module.describe(artefact.path)["audit"]["sparsity"] == 0.5


def test_onnx_model_file_stays_under_the_protobuf_limit(tmp_path, monkeypatch):
    """The limit lowered to 3 MB (the tiny graph's nodes alone are about 2 MB): inline sparse data past the budget is
    stored dense, and dense data goes external."""
    if "onnx" not in INSTALLED:
        pytest.skip("onnx not installed")
    module = exporters.get("onnx")
    limit = 3_000_000
    monkeypatch.setattr(module, "PROTOBUF_LIMIT", limit)
    model, tokenizer, spec = pruned_tiny("bfloat16")
    artefact = module.export(model, tokenizer, tmp_path / "o", spec("onnx", sparse="always"))
    assert (tmp_path / "o" / "model.onnx").stat().st_size < limit
    assert "model.onnx.data" in artefact.files
    assert any("stored dense, inline sparse data would pass the protobuf limit" in n for n in artefact.notes)
    assert not artefact.notes[0].startswith("0 of")  # some weights still fit inline as sparse tensors
    with module.load(artefact.path, exporters.RuntimeOptions()) as runner:
        assert (runner.logits(IDS) - TorchRunner(model).logits(IDS)).abs().max() <= 1e-4
