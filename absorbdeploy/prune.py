"""Pruning one weight matrix to an exact count (pure functions over tensors), and the `PRUNERS` table.

Each pruner declares the calibration statistic it reads (`needs`): nothing (magnitude, pruning §2.1), the input norms
||x_j|| (Wanda, §2.2) or the Hessian proxy sum_t x_t x_t^T (SparseGPT, §2.3). `prepare` turns that statistic into what
`prune` reads, once per distinct input (q/k/v share one, gate/up share one); `prune` returns the new fp32 weight with
exactly k zeros, or N of every M consecutive inputs of each row. Adding a pruner is one entry here plus its functions.
"""

from dataclasses import dataclass
from enum import Enum
from typing import Callable

from absorbdeploy import masks, sparsegpt


class Statistic(str, Enum):
    """The calibration statistic a pruner reads."""

    NOTHING = "nothing"
    NORMS = "norms"  # sum_t x_tj^2 per input j
    HESSIAN = "hessian"  # sum_t x_t x_t^T


@dataclass(frozen=True)
class Prepared:
    """What a pruner reads of one input's statistics."""

    col_norm: object = None  # [in] fp32: ||x_j|| over the calibration tokens (Wanda)
    upper: object = None  # [in, in] fp32: upper Cholesky factor of the damped H^-1 (SparseGPT)
    dampening: float | None = None  # the dampening that made H positive definite (SparseGPT)


@dataclass(frozen=True)
class Pruner:
    needs: Statistic
    prepare: Callable  # (sq_sum [in] | None, hessian [in, in] | None, options) -> Prepared
    prune: Callable  # (weight [out, in], Prepared, k: int, nm: (N, M) | None, options) -> fp32 weight
    options: str | None  # the recipe's options section for this pruner (prune.<options>), if any
    summary: str


def _nothing(sq_sum, hessian, options) -> Prepared:
    return Prepared()


def _magnitude(weight, prepared: Prepared, k: int, nm, options):
    scores = masks.magnitude_scores(weight)
    mask = masks.nm_mask(scores, *nm) if nm else masks.smallest_k_mask(scores, k)  # one threshold per matrix
    return weight.float().masked_fill(mask, 0.0)


def _norms(sq_sum, hessian, options) -> Prepared:
    return Prepared(col_norm=sq_sum.sqrt())


def _wanda(weight, prepared: Prepared, k: int, nm, options):
    scores = masks.wanda_scores(weight, prepared.col_norm)
    mask = masks.nm_mask(scores, *nm) if nm else masks.row_mask(scores, k)  # Wanda compares within each output row
    return weight.float().masked_fill(mask, 0.0)


def _factor(sq_sum, hessian, options) -> Prepared:
    upper, dampening = sparsegpt.inverse_factor(hessian, options.dampening)
    return Prepared(upper=upper, dampening=dampening)


def _sparsegpt(weight, prepared: Prepared, k: int, nm, options):
    return sparsegpt.prune(weight, prepared.upper, k=None if nm else k, nm=nm, blocksize=options.blocksize)


PRUNERS = {
    "magnitude": Pruner(Statistic.NOTHING, _nothing, _magnitude, None, "|W|, one threshold per matrix (Han et al.)"),
    "wanda": Pruner(Statistic.NORMS, _norms, _wanda, None, "|W| ||x||, per output row (Sun et al. 2023)"),
    "sparsegpt": Pruner(Statistic.HESSIAN, _factor, _sparsegpt, "sparsegpt", "OBS updates, block 128 (Frantar & Alistarh 2023)"),
}


def relative_error(old, new, sq_sum) -> float | None:
    """sum_j dW_rj^2 nu_j / sum_j W_rj^2 nu_j: the output error under a diagonal input model (None without nu)."""
    if sq_sum is None:
        return None
    nu = sq_sum.to(old.device).unsqueeze(0)
    denominator = float((old.float().square() * nu).sum())
    return float(((old.float() - new).square() * nu).sum()) / denominator if denominator > 0 else 0.0


@dataclass(frozen=True)
class MatrixRecord:
    block: int
    name: str
    numel: int
    target_zeros: int
    zeros: int
    rel_error: float | None
    dampening: float | None = None  # SparseGPT: the dampening that gave a positive-definite Hessian
    reconstruction: dict | None = None  # on a block's last record: reconstruct.reconstruct's losses, when it ran
