"""Comparing an artefact's scores with the reference, and the gate verdicts that decide the exit code (pure over
tensors and dicts; validate.py drives the runtimes).

The reference is the pruned model's scores in fp32 torch: next-token log-probs and top-1 over all evaluation windows,
full logits over the first `compare_windows`. A runner is compared on the same windows: perplexity, top-1 agreement,
max |delta log-prob of the next token| and, where the runtime exposes logits, max |delta logit| over the vocabulary.
Scores with NaN/inf are never compared (no perplexity, no "agreement 1.0" from NaN): they fail `finite_scores`.
"""

import time
from dataclasses import dataclass

from absorbdeploy.runners import Runner, perplexity


@dataclass
class Reference:
    target_lp: object  # [N, T-1]
    top1: object  # [N, T-1]
    logits: object  # [C, T, V] for the first C windows
    ppl: float | None  # None when any score is non-finite
    nonfinite: int = 0  # non-finite log-probs and logits


def nonfinite(*tensors) -> int:
    """How many entries of the given tensors (None skipped) are NaN or infinite."""
    import torch

    return sum(int((~torch.isfinite(t)).sum()) for t in tensors if t is not None)


def finite_perplexity(target_lp) -> float | None:
    """pydoc-v1 perplexity, or None when a log-prob is NaN/inf (a number computed from NaN is not a perplexity)."""
    return None if nonfinite(target_lp) else perplexity(target_lp)


def reference(runner: Runner, windows, compare_windows: int) -> Reference:
    """Scores of every window plus full logits of the first `compare_windows` (computed as one batch, so that a runtime
    given the same batch can match bit for bit)."""
    scores = runner.score(windows)
    first = min(compare_windows, windows.shape[0])
    logits = runner.logits(windows[:first]).float() if first else None
    bad = nonfinite(scores.target_logprobs, logits)
    return Reference(scores.target_logprobs, scores.top1, logits, None if bad else perplexity(scores.target_logprobs), bad)


def quantized_reference(model, prunable, values: str, store_dtype, runner, windows, compare_windows: int,
                        activations: str | None = None) -> Reference:
    """The reference of an artefact whose packed values are quantized (`values`, e.g. "int8"): `model`'s prunable
    weights (state-dict names) replaced in place by what the artefact stores, decoded (codec.quantize_values, q *
    scale), scored by `runner` (which runs `model`), then restored. With `activations` codec.INT8_PER_TOKEN (W8A8)
    the inputs of those Linears are also replaced by what the kernel multiplies, x_q * x_scale (kernels.ops
    .quantize_tokens), through forward pre-hooks removed afterwards. The equivalence gates then test the export and
    its kernel, and the quantization's own cost is the PPL ratio against the unquantized reference. Saved copies are
    kept in `store_dtype` (torch dtype name), the export dtype the weights were rounded to, so restoring is exact.
    Raises ValueError for a scheme it does not know."""
    import torch

    from absorbdeploy.sparse.codec import INT8_PER_TOKEN, quantize_values

    if values != "int8" or activations not in (None, INT8_PER_TOKEN):
        raise ValueError(f"no quantized reference for {values!r} values with {activations!r} activations")
    saved, hooks = {}, []
    try:
        with torch.no_grad():
            for name in prunable:
                weight = model.get_parameter(name)
                saved[name] = weight.detach().to("cpu", getattr(torch, store_dtype), copy=True)
                q, scales = quantize_values(weight.detach())
                weight.copy_((q.float() * scales.unsqueeze(1)).to(weight.device, weight.dtype))
                if activations:
                    module = model.get_submodule(name.rpartition(".")[0])
                    hooks.append(module.register_forward_pre_hook(_fake_quantized_input))
        return reference(runner, windows, compare_windows)
    finally:
        for hook in hooks:
            hook.remove()
        with torch.no_grad():
            for name, original in saved.items():
                model.get_parameter(name).copy_(original)


def _fake_quantized_input(module, args):
    """A Linear's input as the W8A8 kernel sees it: quantized per token, dequantized in fp32 (then x's dtype)."""
    from absorbdeploy.sparse.kernels.ops import quantize_tokens

    x = args[0]
    x_q, scales = quantize_tokens(x.reshape(-1, x.shape[-1]))
    return ((x_q.float() * scales).reshape(x.shape).to(x.dtype), *args[1:])


def compare(runner: Runner, ref: Reference, windows) -> dict:
    """Scores of `runner` on `windows` against the reference."""
    start = time.perf_counter()
    scores = runner.score(windows)
    mine = runner.logits(windows[: ref.logits.shape[0]]).float() if runner.exposes_logits and ref.logits is not None else None
    result = {
        "nonfinite": nonfinite(scores.target_logprobs, mine),
        "ppl": None, "top1_agreement": None, "max_abs_logprob_diff": None, "max_abs_logit_diff": None,
        "logit_metric": "next-token log-prob (the runtime exposes log-probs, not logits)",
    }
    if mine is not None:
        result["logit_metric"] = f"logits over the full vocabulary, first {ref.logits.shape[0]} windows"
    if not result["nonfinite"] and not ref.nonfinite:  # comparisons with NaN would say nothing (or "agreement 1.0")
        result["ppl"] = perplexity(scores.target_logprobs)
        result["top1_agreement"] = float((scores.top1 == ref.top1).float().mean())
        result["max_abs_logprob_diff"] = float((scores.target_logprobs - ref.target_lp).abs().max())
        if mine is not None:
            result["max_abs_logit_diff"] = float((mine - ref.logits).abs().max())
    result["score_seconds"] = time.perf_counter() - start
    return result


def checked_diff(result: dict) -> float:
    """The number the max_abs_logit_diff gate reads: logits where the runtime has them, else next-token log-probs."""
    value = result.get("max_abs_logit_diff")
    return result.get("max_abs_logprob_diff") if value is None else value


def gate_verdicts(gates, artefacts: dict) -> list[dict]:
    """One verdict per (gate, artefact); `gates` is the recipe's validate.gates section, `artefacts` maps a name to its
    comparison dict (with ppl_ratio)."""
    verdicts = []
    for name, result in artefacts.items():
        if "error" in result:
            verdicts.append({"gate": "reload", "artefact": name, "value": None, "limit": None, "passed": False,
                             "detail": result["error"]})
            continue
        for what, count in (("", result.get("nonfinite", 0)), (" (dense baseline)", result.get("dense_nonfinite", 0))):
            if count:
                verdicts.append({"gate": "finite_scores", "artefact": name + what, "value": count, "limit": 0,
                                 "passed": False, "detail": f"{count} NaN/inf log-probs or logits in {result['runtime']}"})
        w8a8 = bool(result.get("activations"))  # equivalence by PPL: its logits are chaotic (recipe.Gates)
        checks = [
            ("max_ppl_ratio", result.get("ppl_ratio"), gates.max_ppl_ratio, lambda v, lim: v <= lim),
            ("max_abs_logit_diff", None if w8a8 else checked_diff(result), gates.max_abs_logit_diff,
             lambda v, lim: v <= lim),
            ("min_top1_agreement", None if w8a8 else result.get("top1_agreement"), gates.min_top1_agreement,
             lambda v, lim: v >= lim),
            ("max_quantization_ppl_ratio", result.get("quantization_ppl_ratio"),
             getattr(gates, "max_quantization_ppl_ratio", None), lambda v, lim: v <= lim),
            ("w8a8_ppl_tolerance", _drift(result.get("ppl"), result.get("reference_ppl")) if w8a8 else None,
             getattr(gates, "w8a8_ppl_tolerance", None), lambda v, lim: v <= lim),
        ]
        for gate, value, limit, ok in checks:
            if limit is None or value is None:
                continue
            verdicts.append({"gate": gate, "artefact": name, "value": value, "limit": limit, "passed": bool(ok(value, limit))})
    return verdicts


def _drift(ppl, reference_ppl):
    return None if ppl is None or not reference_ppl else abs(ppl / reference_ppl - 1)


def ratio(a, b):
    return None if a is None or not b else a / b


def show(value, spec: str = ".3f") -> str:
    return "n/a (non-finite scores)" if value is None else format(value, spec)


def torch_verdicts(reference_nonfinite: int, dense_nonfinite: int) -> list[dict]:
    """The in-memory models themselves must score finitely, or no comparison against them means anything."""
    return [{"gate": "finite_scores", "artefact": what, "value": count, "limit": 0, "passed": False,
             "detail": f"{count} NaN/inf log-probs or logits from the {what}"}
            for what, count in (("in-memory pruned model (torch)", reference_nonfinite),
                                ("in-memory dense model (torch)", dense_nonfinite)) if count]
