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
(`propagate`, `token_metrics`, `coefficients`, `correct`); probe.py drives a real model's blocks through it.
"""

import math
from dataclasses import dataclass
from typing import Callable

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


def _gain(drift_by_eps, composed_logs, eps, eps_small) -> list[float | None]:
    return [None if g is None else -g for g in _gains(drift_by_eps[eps])]


def _composed(drift_by_eps, composed_logs, eps, eps_small) -> list[float]:
    return [-sum(composed_logs[l + 1 :]) for l in range(len(composed_logs))]


def _margin(drift_by_eps, composed_logs, eps, eps_small) -> list[float | None]:
    small = _gains(drift_by_eps[eps_small])
    return [None if s is None or g is None else s - g for s, g in zip(small, _gains(drift_by_eps[eps]))]


def _paper(drift_by_eps, composed_logs, eps, eps_small) -> list[float | None]:
    bound = math.log(3.0)
    return [None if g is None else -min(max(g, -bound), bound) for g in _gains(drift_by_eps[eps])]


def _gains(drift) -> list[float | None]:
    """ln(r_{l,last} / r_{l,l}) for every injection block l of one eps; `last` is the deepest block the probe followed
    that injection to (the last block, or l + absorption.horizon); None where the probe injected nothing at l
    (absorption.injection_stride)."""
    return [gain_log(drift[l], l, max(drift[l])) if drift[l] else None for l in range(len(drift))]


def interpolate(values: list[float | None]) -> list[float]:
    """Fill the blocks the probe skipped (None) linearly in depth between the nearest measured blocks on either side
    (the nearest one alone at an end). Raises ValueError if no block was measured."""
    measured = [i for i, v in enumerate(values) if v is not None]
    if not measured:
        raise ValueError("no block was measured")
    out = []
    for i, v in enumerate(values):
        if v is None:
            left = max((m for m in measured if m < i), default=None)
            right = min((m for m in measured if m > i), default=None)
            if left is None or right is None:
                v = values[left if right is None else right]
            else:
                t = (i - left) / (right - left)
                v = (1 - t) * values[left] + t * values[right]
        out.append(v)
    return out


@dataclass(frozen=True)
class Definition:
    """One absorption coefficient: the probe measurements it reads and how it turns them into alpha_l."""

    eps: Callable  # (eps, eps_small) -> the eps values whose drift curves it needs
    composed: bool  # needs the composed gains along the pruned model's own trajectory
    coefficients: Callable  # (drift_by_eps, composed_logs, eps, eps_small) -> [alpha_l]
    summary: str
    perturbation: str | None = None  # what the probe injects when fixed by the definition (None: the recipe's
    # absorption.perturbation, the real pruning error by default)
    scaled: bool = True  # min-max normalise alpha before the correction (ours) or use it raw (paper)
    mode: str | None = None  # a correction mode of its own, whatever the base allocator's


DEFINITIONS = {
    "gain": Definition(lambda eps, small: [eps], False, _gain, "A: -ln(r_{l,L} / r_{l,l}) at eps"),
    "composed": Definition(lambda eps, small: [], True, _composed, "B: -sum_{k>l} ln g_k on the pruned trajectory"),
    "margin": Definition(lambda eps, small: [small, eps], False, _margin, "C: ln G_l(eps_small) - ln G_l(eps)"),
    # arXiv 2606.15161 as a secondary summary describes it (its method section is not public): Gaussian perturbations,
    # u_l = clip(ln(R_L / R_l), +-ln 3), Delta_l = -(u_l - mean u) added to the base ratios, rescaled to the budget.
    "paper": Definition(lambda eps, small: [eps], False, _paper, "-clip(ln(r_{l,L}/r_{l,l}), +-ln 3) under Gaussian "
                        "noise, added raw (reconstructed from a summary)", perturbation="gaussian", scaled=False,
                        mode="additive"),
}


def coefficients(definition: str, drift_by_eps: dict, eps: float, eps_small: float, composed_logs=None) -> list[float]:
    """alpha_l for every block (larger = more absorbed) from the probe's drift curves {eps: [l][k] -> r}; blocks the
    probe did not inject at (absorption.injection_stride) are interpolated linearly in depth."""
    return interpolate(DEFINITIONS[definition].coefficients(drift_by_eps, composed_logs, eps, eps_small))


def _additive(base, a, params, target, strength) -> list[float]:
    mean = sum(a) / len(a)
    return [s + 2 * strength * (x - mean) for s, x in zip(base, a)]


def _multiplicative(base, a, params, target, strength) -> list[float]:
    raw = [s * (1 - strength + 2 * strength * x) for s, x in zip(base, a)]
    scale = target * sum(params) / sum(n * s for n, s in zip(params, raw))
    return [s * scale for s in raw]


CORRECTIONS = {"additive": _additive, "multiplicative": _multiplicative}


def correct(base, coeffs, params, target: float, strength: float, mode: str, low: float, high: float,
            scaled: bool = True) -> list[float]:
    """a = minmax(alpha); additive s + 2 lam (a - mean a) or multiplicative s (1 - lam + 2 lam a) rescaled to the
    budget; then the exact-budget projection onto [low, high]. Unscaled, a = alpha / 2, so additive adds
    lam (alpha - mean alpha). strength 0 returns `base` unchanged."""
    if strength == 0:
        return list(base)
    a = _minmax(coeffs) if scaled else [c / 2 for c in coeffs]
    return project(CORRECTIONS[mode](base, a, params, target, strength), params, target, low, high)


def summarise(result: dict, definition: str, eps: float, eps_small: float) -> dict:
    """Coefficients plus the drift / cosine / absolute-drift matrices [injection l][block k] (None where k < l)."""
    n = len(next(iter(result["curves"].values()))) if result["curves"] else len(result["composed_logs"])
    drift = {e: [c["rel"] for c in rows] for e, rows in result["curves"].items()}
    coeffs = coefficients(definition, drift, eps, eps_small, result["composed_logs"])
    curves = {str(e): {m: [[rows[l][m].get(k) for k in range(n)] for l in range(n)] for m in ("rel", "cos", "abs")}
              for e, rows in result["curves"].items()}
    return {"coefficients": coeffs, "curves": curves, "composed_log_gains": result["composed_logs"]}
