"""Stage 5, absorb: how much of block l's pruning error the rest of the network absorbs, and the allocation it implies.

This is *an* implementation of the idea of arXiv 2606.15161 (its method section is not public; definitions are ours,
pruning §6). The probe injects the real pruning error of block l, delta_l = f_l(h; W~_l) - f_l(h; W_l) at the base
allocator's sparsity s_l, scaled by eps, into the dense residual stream after block l and propagates it through the
dense blocks l+1..L-1. At every later block it records, per token (the first `skip_tokens` skipped), the relative L2
drift r = |h~ - h| / |h|, the cosine between h~ and h, and the absolute drift |h~ - h|, averaged over tokens.
Coefficients (larger = more absorbed = may take more sparsity):
  gain      A: alpha_l = -ln(r_{l,L-1} / r_{l,l}) at eps (end-to-end relative gain; 0 for the last block)
  composed  B: alpha_l = -sum_{k>l} ln g_k, g_k = r_out/r_in of dense block k on the pruned model's own trajectory
  margin    C: alpha_l = ln G_l(eps_small) - ln G_l(eps): absorption beyond what the linearised network predicts
Correction: a = minmax(alpha); additive s' = s + 2 lam (a - mean a) or multiplicative s' = s (1 - lam + 2 lam a);
then the exact-budget projection. strength 0 returns the base allocation unchanged. The drift math is pure
(`propagate`, `token_metrics`, `coefficients`, `correct`); `probe` adapts the model's blocks to it.
"""

import math
import time

from absorbdeploy.allocate import _minmax, project


def token_metrics(perturbed, dense, skip: int) -> tuple[float, float, float]:
    """Mean over tokens (first `skip` dropped) of relative drift, cosine and absolute drift; inputs [B, T, d]."""
    import torch

    p, d = perturbed[:, skip:].double(), dense[:, skip:].double()
    diff = (p - d).norm(dim=-1)
    rel = diff / d.norm(dim=-1).clamp_min(1e-30)
    cos = torch.nn.functional.cosine_similarity(p, d, dim=-1)
    return float(rel.mean()), float(cos.mean()), float(diff.mean())


def propagate(blocks, states, delta, inject: int, eps: float, skip: int) -> dict:
    """Add eps*delta to the output of block `inject` and run blocks inject+1.. ; metrics at every block output >= inject.

    `blocks[k]` maps block k's input to its output; `states[k]` is the dense input of block k (states[k+1] its output).
    """
    hidden = states[inject + 1] + eps * delta
    rows = {"rel": {}, "cos": {}, "abs": {}}
    for k in range(inject, len(blocks)):
        if k > inject:
            hidden = blocks[k](hidden)
        rel, cos, ab = token_metrics(hidden, states[k + 1], skip)
        rows["rel"][k], rows["cos"][k], rows["abs"][k] = rel, cos, ab
    return rows


def gain_log(drift: dict, inject: int, last: int) -> float:
    """ln(r_{l,L-1} / r_{l,l})."""
    return math.log(max(drift[last], 1e-300) / max(drift[inject], 1e-300))


def composed_gains(dense_blocks, pruned_blocks, states, skip: int) -> list[float]:
    """ln g_k along the pruned model's trajectory: g_k = r(dense block k on pruned input) / r(pruned input)."""
    logs, hidden = [0.0], pruned_blocks[0](states[0])  # block 0 sees the exact embedding: r_in = 0
    for k in range(1, len(dense_blocks)):
        r_in = token_metrics(hidden, states[k], skip)[0]
        r_out = token_metrics(dense_blocks[k](hidden), states[k + 1], skip)[0]
        logs.append(math.log(max(r_out, 1e-300) / max(r_in, 1e-300)))
        hidden = pruned_blocks[k](hidden)
    return logs


def coefficients(definition: str, drift_by_eps: dict, eps: float, eps_small: float, composed_logs=None) -> list[float]:
    if definition == "composed":
        n = len(composed_logs)
        return [-sum(composed_logs[l + 1 :]) for l in range(n)]
    big = drift_by_eps[eps]
    last = max(big[0])
    gains = [gain_log(big[l], l, last) for l in range(len(big))]
    if definition == "gain":
        return [-g for g in gains]
    small = drift_by_eps[eps_small]
    return [gain_log(small[l], l, last) - g for l, g in enumerate(gains)]


def correct(base, coeffs, params, target: float, strength: float, mode: str, low: float, high: float) -> list[float]:
    if strength == 0:
        return list(base)
    a = _minmax(coeffs)
    if mode == "additive":
        mean = sum(a) / len(a)
        raw = [s + 2 * strength * (x - mean) for s, x in zip(base, a)]
    else:
        raw = [s * (1 - strength + 2 * strength * x) for s, x in zip(base, a)]
        scale = target * sum(params) / sum(n * s for n, s in zip(params, raw))
        raw = [s * scale for s in raw]
    return project(raw, params, target, low, high)


# --------------------------------------------------------------------------------------- the probe on a real model


class _Pruned:
    """Block l with its Linears temporarily replaced by their pruned versions at sparsity s (dense statistics)."""

    def __init__(self, block, stats, sparsity: float, cfg):
        from absorbdeploy.load import prunable_linears
        from absorbdeploy.prune import new_weight

        self.block, self.linears = block, prunable_linears(block)
        sizes = [m.weight.numel() for _, m in self.linears]
        from absorbdeploy.allocate import integer_counts

        counts = integer_counts([sparsity], [sizes], sparsity)[0]
        factors = {}
        self.weights = [new_weight(m.weight.data, stats.get(n) if stats else None, k, cfg, factors)[0].to(m.weight.dtype)
                        for (n, m), k in zip(self.linears, counts)]

    def __enter__(self):
        self.saved = [m.weight.data for _, m in self.linears]
        for (_, m), w in zip(self.linears, self.weights):
            m.weight.data = w
        return self.block

    def __exit__(self, *exc):
        for (_, m), w in zip(self.linears, self.saved):
            m.weight.data = w


def probe(runner, profile, sparsities, recipe, eps_values, composed: bool, progress=None) -> dict:
    """Drift curves for every injection block at each eps in ONE pass over the blocks, then the composed gains.

    Block-major: when block k is loaded, it advances every trajectory injected before k, then block k's own pruning
    error is injected. Each block is read once, which is what streaming mode needs; the live trajectories (n_blocks x
    len(eps) probe-sized states at most) are the memory this costs.
    """
    import torch

    ab, cfg, states = recipe.absorption, recipe.prune, profile.probe_hidden
    n = len(runner.blocks)
    curves = {eps: [{"rel": {}, "cos": {}, "abs": {}} for _ in range(n)] for eps in eps_values}
    live: list[tuple[int, float, object]] = []
    counter = {"forwards": 0}
    generator = torch.Generator().manual_seed(recipe.calibration.seed)
    start = time.perf_counter()

    def record(l, eps, hidden, k):
        rel, cos, ab_ = token_metrics(hidden, states[k + 1], ab.skip_tokens)
        row = curves[eps][l]
        row["rel"][k], row["cos"][k], row["abs"][k] = rel, cos, ab_

    def block_fn(k, pruned: bool):
        def fn(hidden):
            counter["forwards"] += hidden.shape[0] // states[0].shape[0]
            with runner.block(k) as block:
                if not pruned:
                    return runner.run(block, hidden)
                with _Pruned(block, profile.stats[k], sparsities[k], cfg) as pruned_block:
                    return runner.run(pruned_block, hidden)
        return fn

    if eps_values:
        for k in range(n):
            with runner.block(k) as block:
                if live:
                    advanced = runner.run(block, torch.cat([h for _, _, h in live]))
                    counter["forwards"] += len(live)
                    live = [(l, eps, h) for (l, eps, _), h in zip(live, advanced.split(states[0].shape[0]))]
                    for l, eps, h in live:
                        record(l, eps, h, k)
                with _Pruned(block, profile.stats[k], sparsities[k], cfg) as pruned:
                    delta = runner.run(pruned, states[k]) - states[k + 1]
                counter["forwards"] += 1
            if ab.perturbation == "gaussian":  # the control: isotropic noise with the same per-token norm
                noise = torch.randn(delta.shape, generator=generator, dtype=delta.dtype)
                delta = noise * (delta.norm(dim=-1, keepdim=True) / noise.norm(dim=-1, keepdim=True).clamp_min(1e-30))
            for eps in eps_values:
                injected = states[k + 1] + eps * delta
                record(k, eps, injected, k)
                if k + 1 < n:
                    live.append((k, eps, injected))
            if progress:
                progress.advance(k + 1, n)
    logs = composed_gains([block_fn(k, False) for k in range(n)], [block_fn(k, True) for k in range(n)], states,
                          ab.skip_tokens) if composed else None
    return {"curves": curves, "composed_logs": logs, "block_forwards": counter["forwards"],
            "seconds": time.perf_counter() - start, "tokens": int(states[0].shape[0] * states[0].shape[1])}


def _needs(definition: str, ab) -> tuple[list[float], bool]:
    if definition == "composed":
        return [], True
    return ([ab.eps_small, ab.eps] if definition == "margin" else [ab.eps]), False


def mode_for(recipe) -> str:
    if recipe.absorption.mode != "auto":
        return recipe.absorption.mode
    return "multiplicative" if recipe.allocation.method == "alpha" else "additive"


def summarise(result: dict, definition: str, ab) -> dict:
    """Coefficients plus the drift / cosine / absolute-drift matrices [injection l][block k] (None where k < l)."""
    n = len(next(iter(result["curves"].values()))) if result["curves"] else len(result["composed_logs"])
    drift = {eps: [c["rel"] for c in rows] for eps, rows in result["curves"].items()}
    coeffs = coefficients(definition, drift, ab.eps, ab.eps_small, result["composed_logs"])
    curves = {str(eps): {m: [[rows[l][m].get(k) for k in range(n)] for l in range(n)] for m in ("rel", "cos", "abs")}
              for eps, rows in result["curves"].items()}
    return {"coefficients": coeffs, "curves": curves, "composed_log_gains": result["composed_logs"]}


def correct_allocation(runner, profile, base, params, recipe, work=None, progress=None) -> tuple[list[float], dict]:
    """Measure the coefficients at the base allocation, correct it; optional fixed-point iterations."""
    ab, a = recipe.absorption, recipe.allocation
    eps_values, composed = _needs(ab.definition, ab)
    mode = mode_for(recipe)
    current, history, cost = list(base), [], {"block_forwards": 0, "seconds": 0.0}
    for iteration in range(ab.iterations):
        result = probe(runner, profile, current, recipe, eps_values, composed,
                       progress.blocks(f"absorption probe {iteration + 1}/{ab.iterations}") if progress else None)
        cost["block_forwards"] += result["block_forwards"]
        cost["seconds"] += result["seconds"]
        summary = summarise(result, ab.definition, ab)
        new = correct(base, summary["coefficients"], params, recipe.prune.sparsity, ab.strength, mode, a.min, a.max)
        change = max(abs(x - y) for x, y in zip(new, current))
        history.append({"coefficients": summary["coefficients"], "sparsity": new, "max_change": change})
        current = new
        if change < 0.005:
            break
    n = len(params)
    absorption = {
        "definition": ab.definition, "strength": ab.strength, "mode": mode, "perturbation": ab.perturbation,
        "eps": eps_values, "probe": {"samples": ab.probe_samples, "seqlen": ab.probe_seqlen, "skip_tokens": ab.skip_tokens},
        "coefficients": history[-1]["coefficients"], "iterations": history, **summary,
        "cost": {**cost, "dense_forward_equivalents": cost["block_forwards"] / n, "probe_tokens": result["tokens"]},
        "base": list(base), "final": current,
    }
    if work is not None:
        from absorbdeploy.plots import write_absorption

        write_absorption(work, absorption)
    return current, absorption


def analyze(runner, profile, base, params, recipe, progress=None) -> dict:
    """The full profile for `absorbdeploy analyze`: drift at eps_small, 0.1 and eps, every definition's coefficients,
    the matched-norm Gaussian control at eps, and the correction the recipe's definition and strength would make."""
    import dataclasses

    ab, a = recipe.absorption, recipe.allocation
    eps_values = sorted({ab.eps_small, 0.1, ab.eps})
    result = probe(runner, profile, base, recipe, eps_values, True, progress.blocks("probe") if progress else None)
    control_recipe = dataclasses.replace(recipe, absorption=dataclasses.replace(ab, perturbation="gaussian"))
    control = probe(runner, profile, base, control_recipe, [ab.eps], False,
                    progress.blocks("gaussian control") if progress else None)
    by_definition = {d: summarise(result, d, ab)["coefficients"] for d in ("gain", "composed", "margin")}
    summary = summarise(result, ab.definition, ab)
    control_summary = summarise(control, "gain", ab)
    mode = mode_for(recipe)
    final = correct(base, by_definition[ab.definition], params, recipe.prune.sparsity, ab.strength, mode, a.min, a.max)
    forwards = result["block_forwards"] + control["block_forwards"]
    return {
        "definition": ab.definition, "strength": ab.strength, "mode": mode, "perturbation": "pruning", "eps": eps_values,
        "probe": {"samples": ab.probe_samples, "seqlen": ab.probe_seqlen, "skip_tokens": ab.skip_tokens},
        "coefficients": by_definition[ab.definition], "by_definition": by_definition,
        "curves": summary["curves"], "composed_log_gains": result["composed_logs"],
        "control": {"perturbation": "gaussian (matched per-token norm)", "eps": ab.eps,
                    "gain_coefficients": control_summary["coefficients"], "curves": control_summary["curves"]},
        "cost": {"block_forwards": forwards, "dense_forward_equivalents": forwards / len(params),
                 "seconds": result["seconds"] + control["seconds"], "probe_tokens": result["tokens"]},
        "base": list(base), "final": final,
    }
