"""compare.py: the comparisons with the reference and the gate verdicts that decide the exit code."""

import math

import pytest
import torch

from absorbdeploy import compare as validate
from absorbdeploy.recipe import Gates
from absorbdeploy.runners import Runner, perplexity, target_logprobs

IDS = torch.randint(0, 16, (3, 12), generator=torch.Generator().manual_seed(0))


class Fixed(Runner):
    """A runner that returns given logits [B, T, V] for IDS."""

    runtime = "fixed"

    def __init__(self, logits):
        self.values = logits

    def logits(self, ids):
        return self.values[: ids.shape[0]]


def _logits(seed: int):
    return torch.randn(3, 12, 16, generator=torch.Generator().manual_seed(seed))


def test_an_identical_runner_agrees_exactly():
    ref = validate.reference(Fixed(_logits(1)), IDS, compare_windows=2)
    result = validate.compare(Fixed(_logits(1)), ref, IDS)
    assert result["nonfinite"] == 0 and result["top1_agreement"] == 1.0
    assert result["max_abs_logit_diff"] == 0.0 and result["max_abs_logprob_diff"] == 0.0
    assert result["ppl"] == pytest.approx(perplexity(target_logprobs(_logits(1), IDS)))
    assert math.isclose(ref.ppl, result["ppl"])


def test_a_different_runner_is_measured_not_excused():
    ref = validate.reference(Fixed(_logits(1)), IDS, compare_windows=2)
    other = _logits(2)
    result = validate.compare(Fixed(other), ref, IDS)
    assert result["max_abs_logit_diff"] == pytest.approx(float((other[:2] - _logits(1)[:2]).abs().max()))
    assert result["top1_agreement"] < 0.5
    verdicts = validate.gate_verdicts(Gates(max_abs_logit_diff=1e-3, min_top1_agreement=0.99), {"x": {**result, "runtime": "r"}})
    assert {v["gate"]: v["passed"] for v in verdicts} == {"max_abs_logit_diff": False, "min_top1_agreement": False}


def test_nan_logits_fail_a_gate_and_claim_no_agreement():
    ref = validate.reference(Fixed(_logits(1)), IDS, compare_windows=2)
    broken = _logits(1).clone()
    broken[0, 3, :] = float("nan")
    result = validate.compare(Fixed(broken), ref, IDS)
    assert result["nonfinite"] > 0
    assert result["ppl"] is None and result["top1_agreement"] is None and result["max_abs_logit_diff"] is None
    verdicts = validate.gate_verdicts(Gates(), {"onnx": {**result, "runtime": "onnxruntime"}})
    assert [v["gate"] for v in verdicts if not v["passed"]] == ["finite_scores"]
    assert "NaN/inf" in verdicts[0]["detail"]


def test_a_non_finite_reference_or_dense_model_is_a_failed_gate():
    broken = _logits(1).clone()
    broken[1, 0, 0] = float("inf")
    ref = validate.reference(Fixed(broken), IDS, compare_windows=2)
    assert ref.ppl is None and ref.nonfinite > 0
    assert validate.compare(Fixed(_logits(1)), ref, IDS)["top1_agreement"] is None
    verdicts = validate.torch_verdicts(ref.nonfinite, 0) + validate.torch_verdicts(0, 5)
    assert [v["artefact"] for v in verdicts] == ["in-memory pruned model (torch)", "in-memory dense model (torch)"]
    assert not any(v["passed"] for v in verdicts) and validate.torch_verdicts(0, 0) == []


def test_gates_read_log_probs_where_a_runtime_has_no_logits():
    result = {"runtime": "vllm", "ppl": 10.0, "ppl_ratio": 1.2, "top1_agreement": 1.0, "max_abs_logprob_diff": 2e-3,
              "max_abs_logit_diff": None, "nonfinite": 0}
    verdicts = validate.gate_verdicts(Gates(max_ppl_ratio=1.5, max_abs_logit_diff=1e-3), {"vllm": result})
    assert {v["gate"]: (v["value"], v["passed"]) for v in verdicts} == {
        "max_ppl_ratio": (1.2, True), "max_abs_logit_diff": (2e-3, False), "min_top1_agreement": (1.0, True)}


def test_a_reload_error_is_a_failed_gate_with_its_cause():
    verdicts = validate.gate_verdicts(Gates(), {"vllm": {"runtime": "vllm", "error": "RuntimeError: engine died"}})
    assert verdicts == [{"gate": "reload", "artefact": "vllm", "value": None, "limit": None, "passed": False,
                         "detail": "RuntimeError: engine died"}]


def test_ratio_and_display_handle_missing_numbers():
    assert validate.ratio(2.0, 4.0) == 0.5 and validate.ratio(None, 4.0) is None and validate.ratio(2.0, 0.0) is None
    assert validate.show(None).startswith("n/a") and validate.show(1.23456) == "1.235"


def test_the_quantized_reference_scores_the_stored_weights_then_restores_them_exactly():
    """The reference of an int8 artefact runs the model with q * scale in place of each pruned weight, and every weight
    is back bit for bit afterwards (saved in the export dtype the weights were rounded to)."""
    import copy

    from absorbdeploy.runners import TorchRunner
    from absorbdeploy.sparse.codec import quantize_values
    from absorbdeploy.tiny import build_tiny_llama

    model, _ = build_tiny_llama()
    names = [n for n, _ in model.named_parameters() if n.endswith("proj.weight")][:5]
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.bfloat16().float())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    runner = TorchRunner(model)
    ref = validate.quantized_reference(model, names, "int8", "bfloat16", runner, IDS, 2)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    quantized = copy.deepcopy(model)
    with torch.no_grad():
        for name in names:
            q, scales = quantize_values(quantized.get_parameter(name))
            quantized.get_parameter(name).copy_(q.float() * scales.unsqueeze(1))
    expected, plain = validate.reference(TorchRunner(quantized), IDS, 2), validate.reference(runner, IDS, 2)
    assert torch.equal(ref.logits, expected.logits) and ref.ppl == expected.ppl != plain.ppl
    with pytest.raises(ValueError, match="no quantized reference"):
        validate.quantized_reference(model, names, "int4", "bfloat16", runner, IDS, 2)


def test_the_w8a8_reference_also_quantizes_the_pruned_linears_inputs_then_removes_its_hooks():
    """With int8-per-token activations the reference multiplies each pruned Linear's input as the kernel does (x_q *
    x_scale per token), only those Linears', and leaves no hook and no changed weight behind."""
    import copy

    from absorbdeploy.runners import TorchRunner
    from absorbdeploy.sparse.codec import INT8_PER_TOKEN, quantize_values
    from absorbdeploy.sparse.kernels.ops import quantize_tokens
    from absorbdeploy.tiny import build_tiny_llama

    model, _ = build_tiny_llama()
    names = [n for n, _ in model.named_parameters() if n.endswith("proj.weight")][:5]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    runner = TorchRunner(model)
    ref = validate.quantized_reference(model, names, "int8", "float32", runner, IDS, 2, INT8_PER_TOKEN)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not any(m._forward_pre_hooks for m in model.modules())

    def fake_quantized(module, args):
        x_q, scales = quantize_tokens(args[0].reshape(-1, args[0].shape[-1]))
        return ((x_q.float() * scales).reshape(args[0].shape),)

    expected = copy.deepcopy(model)
    with torch.no_grad():
        for name in names:
            q, scales = quantize_values(expected.get_parameter(name))
            expected.get_parameter(name).copy_(q.float() * scales.unsqueeze(1))
            expected.get_submodule(name.rpartition(".")[0]).register_forward_pre_hook(fake_quantized)
    w8a16 = validate.quantized_reference(model, names, "int8", "float32", runner, IDS, 2)
    assert torch.equal(ref.logits, validate.reference(TorchRunner(expected), IDS, 2).logits)
    assert not torch.equal(ref.logits, w8a16.logits)
    with pytest.raises(ValueError, match="no quantized reference"):
        validate.quantized_reference(model, names, "int8", "float32", runner, IDS, 2, "int8-per-tensor")


def test_w8a8_artefacts_are_gated_on_their_reference_ppl_not_on_logits():
    w8a8 = {"ppl": 10.05, "reference_ppl": 10.0, "top1_agreement": 0.9, "max_abs_logit_diff": 4.0,
            "quantization_ppl_ratio": 1.01, "activations": "int8-per-token"}
    exact = {**w8a8, "activations": None}
    verdicts = {(v["gate"], v["artefact"]): v for v in validate.gate_verdicts(Gates(), {"w8a8": w8a8, "exact": exact})}
    assert verdicts[("w8a8_ppl_tolerance", "w8a8")]["passed"]
    assert abs(verdicts[("w8a8_ppl_tolerance", "w8a8")]["value"] - 0.005) < 1e-12
    assert ("max_abs_logit_diff", "w8a8") not in verdicts and ("min_top1_agreement", "w8a8") not in verdicts
    assert not verdicts[("max_abs_logit_diff", "exact")]["passed"] and ("w8a8_ppl_tolerance", "exact") not in verdicts
    far = validate.gate_verdicts(Gates(), {"w8a8": {**w8a8, "ppl": 10.2}})
    assert not next(v for v in far if v["gate"] == "w8a8_ppl_tolerance")["passed"]
