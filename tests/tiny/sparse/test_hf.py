"""The served-sparse `bitmask` format through transformers' own door: `import absorbdeploy`, then from_pretrained.
The loaded model holds only packed weights, runs the kernel, matches the in-memory pruned model, generates the same
tokens; plain transformers refuses the directory instead of loading random weights."""

import json
import subprocess
import sys

import pytest
import torch

from absorbdeploy import exporters
from absorbdeploy.runners import TorchRunner
from absorbdeploy.sparse.linear import BitmaskLinear, resident_weight_bytes
from tests.tiny.test_exporters import IDS, pruned_tiny


class _QuantizedInput(torch.autograd.Function):
    """What the W8A8 kernel multiplies: x quantized per token, dequantized; gradients pass straight through, as the
    op's autograd rule (dL/dx = dL/dy W) lets them."""

    @staticmethod
    def forward(ctx, x):
        from absorbdeploy.sparse.kernels.ops import quantize_tokens

        x_q, scales = quantize_tokens(x.reshape(-1, x.shape[-1]))
        return (x_q.float() * scales).reshape(x.shape).to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        return grad


@pytest.fixture(scope="module", params=["bfloat16", "float16", "int8", "int8-w8a8"])
def exported(request, tmp_path_factory):
    """(the model the export must equal, its directory, the values dtype); int8 values are compared with the pruned
    model whose weights are what int8 stores, decoded (q * scale), and W8A8 (int8 activations too) with that model
    whose pruned Linears see their inputs quantized per token."""
    import copy
    import dataclasses

    from absorbdeploy.sparse.codec import quantize_values

    int8, w8a8 = request.param.startswith("int8"), request.param == "int8-w8a8"
    model, tokenizer, spec = pruned_tiny("bfloat16" if int8 else request.param)
    out = tmp_path_factory.mktemp("bitmask") / "bitmask"
    exporters.get("bitmask").export(model, tokenizer, out, dataclasses.replace(
        spec("bitmask"), values="int8" if int8 else "auto", activations="int8" if w8a8 else "float"))
    if int8:
        model = copy.deepcopy(model)
        with torch.no_grad():
            for name in spec("bitmask").prunable:
                q, scales = quantize_values(model.get_parameter(name))
                model.get_parameter(name).copy_(q.float() * scales.unsqueeze(1))
                if w8a8:
                    model.get_submodule(name.rpartition(".")[0]).register_forward_pre_hook(
                        lambda module, args: (_QuantizedInput.apply(args[0]),))
    return model, out, "int8" if int8 else request.param


def _load(out, dtype=torch.float32):
    import absorbdeploy  # noqa: F401  (registers the format with transformers)
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(out, dtype=dtype)


def test_loads_with_packed_linears_only_and_matches_the_pruned_model(exported):
    model, out, dtype = exported
    loaded = _load(out)
    linears = [m for layer in loaded.model.layers for m in layer.modules() if isinstance(m, torch.nn.Linear)]
    packed = [m for layer in loaded.model.layers for m in layer.modules() if isinstance(m, BitmaskLinear)]
    assert linears == [] and len(packed) == 28
    assert all(m.compressed.dtype == getattr(torch, dtype) for m in packed)
    quantization = json.loads((out / "config.json").read_text())["quantization_config"]
    assert all(m.quantize_x == ("input_activations" in quantization) for m in packed)
    expected, got = TorchRunner(model).logits(IDS), TorchRunner(loaded).logits(IDS)
    assert (got - expected).abs().max() <= _tolerance(quantization) * expected.abs().max()
    assert resident_weight_bytes(loaded) < resident_weight_bytes(model) / 2  # fp32 dense vs packed 16-bit


def _tolerance(quantization: dict) -> float:
    """fp32 summation order, or for W8A8 also the activation rounding: an fp32 difference upstream that moves x / scale
    across a rounding boundary changes that x_q by one step, and later layers carry it (seen: 4e-3 of the largest
    logit on this tiny model; the first position, with nothing upstream of it but the embedding, agrees to 1e-7)."""
    return 1e-2 if "input_activations" in quantization else 1e-5


def test_greedy_generation_is_the_same(exported):
    model, out, _ = exported
    loaded = _load(out)
    prompt = IDS[:1, :12]
    kwargs = dict(max_new_tokens=12, do_sample=False)
    assert torch.equal(loaded.generate(prompt, **kwargs), model.generate(prompt, **kwargs))


def test_casting_the_model_keeps_the_stored_values(exported):
    _, out, dtype = exported
    loaded = _load(out, dtype=torch.bfloat16).to(torch.float32)
    module = loaded.model.layers[0].self_attn.q_proj
    assert module.compressed.dtype == getattr(torch, dtype) and loaded.model.norm.weight.dtype == torch.float32
    assert module.weight_scale is None or module.weight_scale.dtype == torch.float32
    before = module.compressed.clone()
    module.half()  # transformers refuses .half() on a quantized model as a whole; the module keeps its bytes anyway
    assert torch.equal(module.compressed, before)


def test_config_names_our_model_type_and_targets(exported):
    _, out, _ = exported
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "absorbdeploy_llama" and config["architectures"] == ["LlamaForCausalLM"]
    quant = config["quantization_config"]
    assert quant["quant_method"] == "absorbdeploy-bitmask" and len(quant["targets"]) == 28
    assert quant["targets"][0] == "model.layers.0.self_attn.q_proj"


# Every standard door without the plugin, and what it says instead of building a model with random weights.
PLAIN_DOORS = {
    "AutoModelForCausalLM": ("from transformers import AutoModelForCausalLM as C", "model type `absorbdeploy_llama`"),
    "LlamaForCausalLM": ("from transformers import LlamaForCausalLM as C", "no file named model.safetensors"),
    "pipeline": ("from transformers import pipeline\nC = types.SimpleNamespace(from_pretrained=lambda d: "
                 "pipeline('text-generation', model=d))", "model type `absorbdeploy_llama`"),
}


@pytest.mark.parametrize("door", list(PLAIN_DOORS))
def test_plain_transformers_refuses_the_directory_through_every_door(exported, door):
    _, out, _ = exported
    setup, message = PLAIN_DOORS[door]
    code = f"import types\n{setup}\nC.from_pretrained({str(out)!r})"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and message in proc.stderr, proc.stderr[-1500:]


@pytest.mark.parametrize("kind", ["row offsets shifted but increasing", "a dropped bitmask", "an unknown values dtype",
                                  "a packed module missing from targets", "a matrix of another Linear's size",
                                  "a target that is not a Linear"])
def test_the_quantizer_refuses_a_damaged_checkpoint_naming_the_module(exported, tmp_path, kind):
    from absorbdeploy.sparse.codec import PackedFormatError
    from tests.tiny.sparse.test_directory import DAMAGE, damaged

    tensors, quantization, message = DAMAGE[kind]
    if kind == "a target that is not a Linear":  # the quantizer sees the model itself
        message = "model.norm: quantization_config.targets names a LlamaRMSNorm, not a Linear"
        tensors = _pack_norm
    with pytest.raises(PackedFormatError, match=message.replace("[", "\\[").replace("]", "\\]")):
        _load(damaged(exported[1], tmp_path / "bitmask", tensors, quantization))


def _pack_norm(state):
    from absorbdeploy.sparse.codec import compress_bitmask

    parts = compress_bitmask(torch.eye(4))
    if any(k.endswith(".weight_scale") for k in state):  # int8 values: the norm packed as they are
        parts = {**compress_bitmask(torch.eye(4, dtype=torch.int8)), "weight_scale": torch.ones(4)}
    return {**state, **{f"model.norm.{p}": v for p, v in parts.items()}}


def test_models_and_configs_pickle_deep_copy_and_save(exported, tmp_path):
    import copy
    import pickle

    model, out, _ = exported
    loaded = _load(out)
    expected = TorchRunner(loaded).logits(IDS)
    for clone in (copy.deepcopy(loaded), pickle.loads(pickle.dumps(loaded))):
        assert torch.equal(TorchRunner(clone).logits(IDS), expected)
    config = pickle.loads(pickle.dumps(loaded.config))
    assert type(config) is type(loaded.config) and config.quantization_config == loaded.config.quantization_config
    torch.save(loaded, tmp_path / "whole.pt")  # a full-module save (loading it back needs weights_only=False)
    assert torch.equal(TorchRunner(torch.load(tmp_path / "whole.pt", weights_only=False)).logits(IDS), expected)


def test_gradients_reach_the_activations_as_through_the_dense_weights(exported):
    """Autograd on (no torch.no_grad) past the kernel's decode batch: d loss / d inputs_embeds equals the dense model's."""
    model, out, _ = exported
    loaded = _load(out)
    ids = IDS[:, :40]
    grads = []
    for m in (loaded, model):
        embeds = m.model.embed_tokens(ids).detach().requires_grad_(True)
        m(inputs_embeds=embeds, labels=ids).loss.backward()
        grads.append(embeds.grad)
    assert not any(p.requires_grad for m in loaded.modules() if isinstance(m, BitmaskLinear) for p in m.parameters())
    quantization = json.loads((out / "config.json").read_text())["quantization_config"]
    assert (grads[0] - grads[1]).abs().max() <= 10 * _tolerance(quantization) * grads[1].abs().max()


def test_import_before_transformers_registers_on_its_import(exported):
    _, out, _ = exported
    code = ("import absorbdeploy, sys; assert 'transformers' not in sys.modules\n"
            "from transformers import AutoModelForCausalLM\n"
            f"m = AutoModelForCausalLM.from_pretrained({str(out)!r}); print(type(m.model.layers[0].mlp.up_proj).__name__)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "BitmaskLinear", proc.stderr[-2000:]


def test_a_two_four_model_uses_the_general_layout(tmp_path):
    model, tokenizer, spec = pruned_tiny("bfloat16", "2:4")
    exporters.get("bitmask").export(model, tokenizer, tmp_path / "b", spec("bitmask"))
    loaded = _load(tmp_path / "b")
    assert (TorchRunner(loaded).logits(IDS) - TorchRunner(model).logits(IDS)).abs().max() <= 1e-4
    assert exporters.get("bitmask").describe(tmp_path / "b")["audit"]["nm_valid"] is True
