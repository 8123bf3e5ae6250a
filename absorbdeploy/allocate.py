"""Stage 4, allocate: one sparsity per decoder block, as pure functions of per-block scores (pruning §3).

- uniform: every block at the target S.
- OWL (§3.1): D_l = % of the block's Wanda scores above M x their mean; s_l = S - (Dhat_l - mean Dhat),
  Dhat = 2 lam (D - min D)/(max D - min D): more outliers, less sparsity; spread exactly 2 lam before clipping.
- AlphaPruning (§3.2): block-mean Hill alpha; r_l = (1-eps) + 2 eps (a - min)/(max - min); s_l = S r_l sum n / sum n r:
  a heavier tail (lower alpha) keeps more weights.
- DLP (§3.3): u_l = mean Wanda score of the block; iota_l = 1 - u_l / sum u; the OWL map with range alpha on iota.
- ATP (§3.4): s_l = S + beta (l - (L-1)/2), an arithmetic progression in depth.
Then `project` (§3.6): the parameter-weighted mean is moved to exactly S by one common shift, clipped to [min, max]
(solved by bisection, so clipping never breaks the budget), and `integer_counts` turns block sparsities into per-matrix
prune counts whose sum is round(S * N) exactly.
"""

import math
from dataclasses import dataclass
from typing import Callable


def _weighted_mean(values, weights) -> float:
    return sum(v * w for v, w in zip(values, weights)) / sum(weights)


def _minmax(values) -> list[float]:
    low, high = min(values), max(values)
    if high - low <= 1e-12 * max(1.0, abs(high)):
        return [0.0] * len(values)
    return [(v - low) / (high - low) for v in values]


def uniform(n_blocks: int, target: float) -> list[float]:
    return [target] * n_blocks


def owl(outlier_ratios, target: float, lam: float) -> list[float]:
    offsets = [2 * lam * d for d in _minmax(outlier_ratios)]
    mean = sum(offsets) / len(offsets)
    return [target - (o - mean) for o in offsets]


def alpha_pruning(block_alphas, params, target: float, eps: float) -> list[float]:
    ratios = [(1 - eps) + 2 * eps * a for a in _minmax(block_alphas)]
    scale = target * sum(params) / sum(n * r for n, r in zip(params, ratios))
    return [r * scale for r in ratios]


def dlp(block_mean_scores, target: float, alpha: float) -> list[float]:
    total = sum(block_mean_scores)
    importance = [1 - u / total for u in block_mean_scores]
    return owl(importance, target, alpha)


def atp_max_beta(n_blocks: int, target: float) -> float:
    return min(2 * target, 2 * (1 - target)) / max(n_blocks - 1, 1)


def atp(n_blocks: int, target: float, beta: float | None) -> list[float]:
    if beta is None:
        beta = 0.5 * atp_max_beta(n_blocks, target)
    middle = (n_blocks - 1) / 2
    return [target + beta * (l - middle) for l in range(n_blocks)]


# ------------------------------------------------------------------------------------------------ block score inputs


def owl_outlier_ratio(block_scores, m: float) -> float:
    """Percentage of all Wanda scores of one block that exceed m times their mean (one ratio per block, not per matrix)."""
    import torch

    flat = torch.cat([s.reshape(-1).float() for s in block_scores])
    return 100.0 * (flat > m * flat.mean()).float().mean().item()


def mean_score(block_scores) -> float:
    total = sum(float(s.float().sum()) for s in block_scores)
    return total / sum(s.numel() for s in block_scores)


# ---------------------------------------------------------------------------------------------------- exact budget


def project(sparsities, params, target: float, low: float, high: float) -> list[float]:
    """clip(s + t, low, high) with the common shift t that makes the parameter-weighted mean exactly `target`."""
    if not low <= target <= high:
        raise ValueError(f"target {target} outside [{low}, {high}]")

    def mean_at(t: float) -> float:
        return _weighted_mean([min(max(s + t, low), high) for s in sparsities], params)

    lo_t, hi_t = low - max(sparsities), high - min(sparsities)
    for _ in range(200):
        mid = (lo_t + hi_t) / 2
        if mean_at(mid) < target:
            lo_t = mid
        else:
            hi_t = mid
    return [min(max(s + (lo_t + hi_t) / 2, low), high) for s in sparsities]


def exact_budget(target: float, total: int) -> int:
    """The number of weights a global sparsity S prunes from N: round(S * N), the one definition of the budget."""
    return round(target * total)


def integer_counts(block_sparsities, matrix_sizes, target: float) -> list[list[int]]:
    """Per-matrix prune counts: round(s_l n_m), residual to round(target N) by largest remainder. Sum is exact."""
    exact = [[s * n for n in sizes] for s, sizes in zip(block_sparsities, matrix_sizes)]
    counts = [[min(n, max(0, math.floor(e))) for e, n in zip(row, sizes)] for row, sizes in zip(exact, matrix_sizes)]
    total = sum(sum(sizes) for sizes in matrix_sizes)
    wanted = exact_budget(target, total)
    flat = [(exact[b][i] - counts[b][i], b, i) for b in range(len(counts)) for i in range(len(counts[b]))]
    residual = wanted - sum(map(sum, counts))
    order = sorted(flat, key=lambda t: t[0], reverse=residual > 0)
    step = 1 if residual > 0 else -1
    while residual:
        moved = False
        for _, b, i in order:
            if residual == 0:
                break
            if 0 <= counts[b][i] + step <= matrix_sizes[b][i]:
                counts[b][i] += step
                residual -= step
                moved = True
        if not moved:
            raise ValueError("cannot reach the budget within the matrix sizes")
    return counts


# ------------------------------------------------------------------------------------------------------ the table


def _wanda(weights, col_norms):
    from absorbdeploy.masks import wanda_scores

    return [wanda_scores(w, n) for w, n in zip(weights, col_norms)]


def _owl_score(weights, col_norms, options) -> float:
    return owl_outlier_ratio(_wanda(weights, col_norms), options.m)


def _dlp_score(weights, col_norms, options) -> float:
    return mean_score(_wanda(weights, col_norms))


def _alpha_score(weights, col_norms, options) -> float:
    from absorbdeploy.esd import matrix_alpha

    return sum(matrix_alpha(w) for w in weights) / len(weights)


@dataclass(frozen=True)
class Allocator:
    """One layer-wise allocator: its per-block signal and how it turns the signals into sparsities."""

    score: Callable | None  # (weights of a block's Linears, their input norms ||x|| or None, options) -> float
    needs_norms: bool  # the score reads Wanda's input norms (a dense calibration pass)
    allocate: Callable  # (scores | None, params per block, target, options) -> raw sparsities (before `project`)
    correction: str  # how the absorption correction composes with it: "additive" or "multiplicative"
    summary: str
    varies: bool = True  # gives blocks different sparsities (an N:M structure fixes every block's: only uniform fits)


ALLOCATORS = {
    "uniform": Allocator(None, False, lambda scores, params, target, o: uniform(len(params), target), "additive",
                         "every block at the target", varies=False),
    "owl": Allocator(_owl_score, True, lambda scores, params, target, o: owl(scores, target, o.lam), "additive",
                     "outlier ratio per block (Yin et al. 2024)"),
    "alpha": Allocator(_alpha_score, False, lambda scores, params, target, o: alpha_pruning(scores, params, target, o.eps),
                       "multiplicative", "heavy-tail exponent of the weight spectra (Lu et al. 2024)"),
    "dlp": Allocator(_dlp_score, True, lambda scores, params, target, o: dlp(scores, target, o.alpha), "additive",
                     "mean Wanda score per block (DLP)"),
    "atp": Allocator(None, False, lambda scores, params, target, o: atp(len(params), target, o.beta), "additive",
                     "arithmetic progression in depth (ATP)"),
}


def base_allocation(method: str, scores, params, target: float, options, low: float, high: float) -> list[float]:
    """The allocator's sparsities, projected onto the exact budget within [low, high]."""
    return project(ALLOCATORS[method].allocate(scores, params, target, options), params, target, low, high)
