"""Stage 5, absorb, on a real model: the absorption probe drives the decoder blocks through absorb.py's pure drift math.

For every injection block l it prunes block l at its base sparsity (from the dense statistics), injects the real
pruning error eps * delta_l after block l and propagates it through the dense later blocks, recording drift at each one;
optionally the composed gains along the pruned model's own trajectory. One block-major pass: each block is read once,
which is what streaming mode needs. `correct_allocation` turns the result into the corrected allocation; `profile`
measures every definition (and the matched-norm Gaussian control) for `absorbdeploy analyze`. Nothing is written here.
"""

import time

from absorbdeploy import absorb
from absorbdeploy.allocate import integer_counts
from absorbdeploy.blocks import prunable_linears
from absorbdeploy.prune_plan import PruneSpec


class _Pruned:
    """Block l with its Linears temporarily replaced by their pruned versions at sparsity s (dense statistics)."""

    def __init__(self, block, stats, sparsity: float, spec: PruneSpec):
        self.block, self.linears = block, prunable_linears(block)
        counts = integer_counts([sparsity], [[m.weight.numel() for _, m in self.linears]], sparsity)[0]
        prepared, self.weights = {}, []
        for (name, m), k in zip(self.linears, counts):
            s = stats.get(name) if stats else None
            if id(s) not in prepared:
                prepared[id(s)] = spec.prepare(s)
            self.weights.append(spec.apply(m.weight.data, prepared[id(s)], k).to(m.weight.dtype))

    def __enter__(self):
        self.saved = [m.weight.data for _, m in self.linears]
        for (_, m), w in zip(self.linears, self.weights):
            m.weight.data = w
        return self.block

    def __exit__(self, *exc):
        for (_, m), w in zip(self.linears, self.saved):
            m.weight.data = w


def probe(runner, profile, sparsities, spec: PruneSpec, ab, eps_values, composed: bool, seed: int,
          progress=None) -> dict:
    """Drift curves for every injection block at each eps in ONE pass over the blocks, then the composed gains.

    `ab` is the absorption options section (skip_tokens, perturbation, horizon, injection_stride; a block the stride
    skips gets empty curves). Block-major: when block k is loaded, it
    advances every trajectory injected before k, then block k's own pruning error is injected; the live trajectories
    (n_blocks x len(eps) probe-sized states at most) are the memory this costs.
    """
    import torch

    states = profile.probe_hidden
    n = len(runner.blocks)
    curves = {eps: [{"rel": {}, "cos": {}, "abs": {}} for _ in range(n)] for eps in eps_values}
    live: list[tuple[int, float, object]] = []
    counter = {"forwards": 0}
    generator = torch.Generator().manual_seed(seed)
    start = time.perf_counter()

    def record(l, eps, hidden, k):
        rel, cos, ab_ = absorb.token_metrics(hidden, states[k + 1], ab.skip_tokens)
        row = curves[eps][l]
        row["rel"][k], row["cos"][k], row["abs"][k] = rel, cos, ab_

    def block_fn(k, pruned: bool):
        def fn(hidden):
            counter["forwards"] += hidden.shape[0] // states[0].shape[0]
            with runner.block(k) as block:
                if not pruned:
                    return runner.run(block, hidden)
                with _Pruned(block, profile.stats[k], sparsities[k], spec) as pruned_block:
                    return runner.run(pruned_block, hidden)
        return fn

    horizon = ab.horizon or n  # how many blocks past its injection a trajectory is followed
    stride = ab.injection_stride or 1  # inject at blocks 0, s, 2s, ... and the last; the rest are interpolated
    if eps_values:
        for k in range(n):
            live = [(l, eps, h) for l, eps, h in live if k - l <= horizon]
            inject = k % stride == 0 or k == n - 1
            with runner.block(k) as block:
                if live:
                    advanced = runner.run(block, torch.cat([h for _, _, h in live]))
                    counter["forwards"] += len(live)
                    live = [(l, eps, h) for (l, eps, _), h in zip(live, advanced.split(states[0].shape[0]))]
                    for l, eps, h in live:
                        record(l, eps, h, k)
                if inject:
                    with _Pruned(block, profile.stats[k], sparsities[k], spec) as pruned:
                        delta = runner.run(pruned, states[k]) - states[k + 1]
                    counter["forwards"] += 1
            if inject and ab.perturbation == "gaussian":  # the control: isotropic noise with the same per-token norm
                noise = torch.randn(delta.shape, generator=generator, dtype=delta.dtype)
                delta = noise * (delta.norm(dim=-1, keepdim=True) / noise.norm(dim=-1, keepdim=True).clamp_min(1e-30))
            for eps in eps_values if inject else ():
                injected = states[k + 1] + eps * delta
                record(k, eps, injected, k)
                if k + 1 < n:
                    live.append((k, eps, injected))
            if progress:
                progress.advance(k + 1, n)
    logs = absorb.composed_gains([block_fn(k, False) for k in range(n)], [block_fn(k, True) for k in range(n)], states,
                                 ab.skip_tokens) if composed else None
    return {"curves": curves, "composed_logs": logs, "block_forwards": counter["forwards"],
            "seconds": time.perf_counter() - start, "tokens": int(states[0].shape[0] * states[0].shape[1])}


def correct_allocation(runner, profile, base, params, target: float, spec: PruneSpec, ab, mode: str, low: float,
                       high: float, seed: int, progress=None) -> tuple[list[float], dict]:
    """Measure the coefficients of `ab.definition` at the base allocation and correct it (`mode`: additive or
    multiplicative); optional fixed-point iterations re-measure at the corrected allocation."""
    import dataclasses

    definition = absorb.DEFINITIONS[ab.definition]
    eps_values = definition.eps(ab.eps, ab.eps_small)
    mode = definition.mode or mode
    measured = dataclasses.replace(ab, perturbation=definition.perturbation or ab.perturbation)
    current, history, cost = list(base), [], {"block_forwards": 0, "seconds": 0.0}
    for iteration in range(ab.iterations):
        result = probe(runner, profile, current, spec, measured, eps_values, definition.composed, seed,
                       progress.blocks(f"absorption probe {iteration + 1}/{ab.iterations}") if progress else None)
        cost["block_forwards"] += result["block_forwards"]
        cost["seconds"] += result["seconds"]
        summary = absorb.summarise(result, ab.definition, ab.eps, ab.eps_small)
        new = absorb.correct(base, summary["coefficients"], params, target, ab.strength, mode, low, high, definition.scaled)
        change = max(abs(x - y) for x, y in zip(new, current))
        history.append({"coefficients": summary["coefficients"], "sparsity": new, "max_change": change})
        current = new
        if change < 0.005:
            break
    return current, {
        "definition": ab.definition, "strength": ab.strength, "mode": mode, "perturbation": measured.perturbation,
        "eps": eps_values, "probe": {"samples": ab.probe_samples, "seqlen": ab.probe_seqlen, "skip_tokens": ab.skip_tokens,
                                     "horizon": ab.horizon, "injection_stride": ab.injection_stride},
        "coefficients": history[-1]["coefficients"], "iterations": history, **summary,
        "cost": {**cost, "dense_forward_equivalents": cost["block_forwards"] / len(params), "probe_tokens": result["tokens"]},
        "base": list(base), "final": current,
    }


def profile_all(runner, profile, base, params, target: float, spec: PruneSpec, ab, mode: str, low: float, high: float,
                seed: int, progress=None) -> dict:
    """The full profile for `absorbdeploy analyze`: drift at eps_small, 0.1 and eps, every definition's coefficients,
    the matched-norm Gaussian control at eps, and the correction the options' definition and strength would make."""
    import dataclasses

    eps_values = sorted({ab.eps_small, 0.1, 0.3, ab.eps})  # the eps sweep: where amplification turns into absorption
    result = probe(runner, profile, base, spec, ab, eps_values, True, seed, progress.blocks("probe") if progress else None)
    control = probe(runner, profile, base, spec, dataclasses.replace(ab, perturbation="gaussian"), [ab.eps], False, seed,
                    progress.blocks("gaussian control") if progress else None)
    measured = {None: result, "gaussian": control}  # by Definition.perturbation
    by_definition = {d: absorb.summarise(measured[definition.perturbation], d, ab.eps, ab.eps_small)["coefficients"]
                     for d, definition in absorb.DEFINITIONS.items()}
    chosen = absorb.DEFINITIONS[ab.definition]
    summary = absorb.summarise(result, "gain", ab.eps, ab.eps_small)  # the real-error curves at every eps, for the plots
    control_summary = absorb.summarise(control, "gain", ab.eps, ab.eps_small)
    final = absorb.correct(base, by_definition[ab.definition], params, target, ab.strength, chosen.mode or mode, low, high,
                           chosen.scaled)
    forwards = result["block_forwards"] + control["block_forwards"]
    return {
        "definition": ab.definition, "strength": ab.strength, "mode": mode, "perturbation": "pruning", "eps": eps_values,
        "probe": {"samples": ab.probe_samples, "seqlen": ab.probe_seqlen, "skip_tokens": ab.skip_tokens,
                  "horizon": ab.horizon, "injection_stride": ab.injection_stride},
        "coefficients": by_definition[ab.definition], "by_definition": by_definition,
        "curves": summary["curves"], "composed_log_gains": result["composed_logs"],
        "control": {"perturbation": "gaussian (matched per-token norm)", "eps": ab.eps,
                    "gain_coefficients": control_summary["coefficients"], "curves": control_summary["curves"]},
        "cost": {"block_forwards": forwards, "dense_forward_equivalents": forwards / len(params),
                 "seconds": result["seconds"] + control["seconds"], "probe_tokens": result["tokens"]},
        "base": list(base), "final": final,
    }
