"""Weight updates with the mask fixed (pure functions over tensors), and the `UPDATES` table.

A pruner chooses which weights become zero; an update then re-fits the weights it kept so that the pruned Linear
reproduces the dense Linear's outputs on the calibration inputs, the layer-wise least-squares problem

    min_W  ||X W^T - X W_dense^T||_F^2   subject to W_rj = 0 wherever the pruner zeroed W_rj,

with H = X^T X = sum_t x_t x_t^T, the fp32 Hessian proxy of calibrate.InputStats (pruning §2.3). The zeros never
move, so the exact per-matrix count and any N:M structure survive every update. Entries:

- `none`: the pruner's weights as they are (for SparseGPT these already carry its own OBS update).
- `sparsegpt`: SparseGPT's one-pass OBS update (Frantar & Alistarh 2023) with the mask given instead of chosen:
  each pruned column's error is spread over the columns to its right (sparsegpt.prune with `mask`).
- `admm`: the ADMM least-squares update with the mask fixed of Boža (2024, arXiv 2401.02938, §3), our schedule:
  with the columns scaled so that diag H = 1 (d_j = sqrt(H_jj)) and H damped by `dampening` I,
      W <- (H + rho I)^-1 (H W_dense + rho (Z - U)),   Z <- (W + U) masked,   U <- U + W - Z,
  rho growing by `growth` every `stage` iterations from `rho` (by default a fixed 0.3); one inverse of H + rho I per
  rho value serves every iteration at it (cost ~ in^3 per value, then one in x in by in x out GEMM per iteration). The result is Z, exactly zero
  on the mask. The problem is convex, so ADMM converges to the constrained least-squares optimum whatever mask and
  start it gets (tests/unit/test_update.py checks it against the exact per-row solution).
"""

from dataclasses import dataclass
from typing import Callable

from absorbdeploy import sparsegpt
from absorbdeploy.prune import Statistic


@dataclass(frozen=True)
class Update:
    needs: Statistic
    prepare: Callable  # (hessian [in, in] fp32 | None, options) -> what `apply` reads for every Linear on that input
    apply: Callable  # (dense [out, in], pruned [out, in] fp32, prepared, options) -> fp32 [out, in], same zeros
    options: str | None  # the recipe's options section for this update (prune.<options>), if any
    summary: str


@dataclass(frozen=True)
class Scaled:
    """The Hessian of one input with its columns scaled to unit diagonal and damped (what `admm` reads)."""

    hessian: object  # [in, in] fp32: H_ij / (d_i d_j) + dampening I
    scale: object  # [in] fp32: d_j = sqrt(H_jj), 1 for dead inputs


def _nothing(hessian, options):
    return None


def _keep(dense, pruned, prepared, options):
    return pruned


def _factor(hessian, options):
    return sparsegpt.inverse_factor(hessian, options.dampening)[0]


def _obs(dense, pruned, upper, options):
    return sparsegpt.prune(dense, upper, mask=pruned == 0, blocksize=options.blocksize)


def scaled_hessian(hessian, dampening: float) -> Scaled:
    """H / (d d^T) + dampening I with d_j = sqrt(H_jj) (1 where H_jj = 0: an input that is always zero)."""
    import torch

    h = hessian.float()
    scale = torch.diagonal(h).clamp_min(0).sqrt()
    scale[scale == 0] = 1.0
    h = h / scale.unsqueeze(0) / scale.unsqueeze(1)
    h.diagonal().add_(dampening)
    return Scaled(h, scale)


def admm(dense, pruned, prepared: Scaled, iterations: int = 20, rho: float = 0.3, growth: float = 1.0, stage: int = 5):
    """The ADMM update with the zeros of `pruned` fixed (module docstring). dense, pruned: [out, in]; returns fp32
    [out, in] with exactly the zeros of `pruned` (a kept weight that lands on 0.0 keeps its pruned value instead)."""
    import torch

    keep = (pruned != 0).T  # [in, out]: the solve runs on W^T, one column per output row
    scale = prepared.scale.unsqueeze(1)
    h = prepared.hessian
    target = h @ (dense.float().T * scale)  # H W_dense^T in scaled coordinates
    z = pruned.float().T * scale
    u = torch.zeros_like(z)
    inverse, current = None, None
    for it in range(iterations):
        value = rho * growth ** (it // stage)
        if value != current:  # an explicit inverse: each iteration is then one GEMM, not two triangular solves
            factor, info = torch.linalg.cholesky_ex(h + value * torch.eye(h.shape[0], dtype=h.dtype, device=h.device))
            if info.item() != 0:
                raise sparsegpt.HessianNotPositiveDefinite(
                    "ADMM update: the damped calibration Hessian is not positive definite; raise "
                    "prune.admm.dampening or use more calibration samples (calibration.nsamples)")
            inverse, current = torch.cholesky_inverse(factor), value
        w = inverse @ (target + value * (z - u))
        z = (w + u) * keep
        u += w - z
    result = (z / scale).T.contiguous()
    lost = (result == 0) & (pruned != 0)
    return torch.where(lost, pruned.float(), result)


def _scale(hessian, options) -> Scaled:
    return scaled_hessian(hessian, options.dampening)


def _admm(dense, pruned, prepared, options):
    return admm(dense, pruned, prepared, options.iterations, options.rho, options.growth, options.stage)


UPDATES = {
    "none": Update(Statistic.NOTHING, _nothing, _keep, None, "the pruner's weights as they are"),
    "sparsegpt": Update(Statistic.HESSIAN, _factor, _obs, "sparsegpt", "OBS update on the given mask (Frantar & Alistarh 2023)"),
    "admm": Update(Statistic.HESSIAN, _scale, _admm, "admm", "least squares on the kept weights by ADMM (Boža 2024)"),
}


def reconstruction_error(dense, weight, hessian) -> float:
    """||X (W - W_dense)^T||_F^2 / ||X W_dense^T||_F^2 = tr(D H D^T) / tr(W H W^T), D = W - W_dense (fp64 sums)."""
    import torch

    h = hessian.double()
    delta = weight.double() - dense.double()
    base = float(torch.einsum("ri,ij,rj->", dense.double(), h, dense.double()))
    return float(torch.einsum("ri,ij,rj->", delta, h, delta)) / base if base > 0 else 0.0
