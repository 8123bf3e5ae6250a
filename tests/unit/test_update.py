"""The updates of the UPDATES table, one matrix at a time: the zeros never move (exact count, N:M kept), and the
kept weights re-fit the dense Linear's outputs, ADMM to the constrained least-squares optimum."""

import pytest
import torch

from absorbdeploy import update
from absorbdeploy.masks import is_nm
from absorbdeploy.prune import PRUNERS, Statistic
from absorbdeploy.prune_plan import PruneSpec
from absorbdeploy.recipe import NM, ADMMOptions, SparseGPTOptions
from absorbdeploy.update import UPDATES, reconstruction_error

OPTIONS = {"sparsegpt": SparseGPTOptions(), "admm": ADMMOptions(), None: None}


def _case(rows=24, columns=64, seed=0):
    """Correlated inputs (so that re-fitting the kept weights can absorb part of the pruned ones), one loud feature."""
    g = torch.Generator().manual_seed(seed)
    mixing = torch.eye(columns) + 0.6 * torch.randn(columns, columns, generator=g) / columns**0.5
    x = torch.randn(512, columns, generator=g) @ mixing
    x[:, 5] *= 4
    return torch.randn(rows, columns, generator=g), x.square().sum(0), x.T @ x


def _spec(pruner, name, nm=None):
    return PruneSpec(PRUNERS[pruner], OPTIONS[PRUNERS[pruner].options], nm, UPDATES[name], OPTIONS[UPDATES[name].options])


def _exact(dense, pruned, hessian, dampening):
    """Per output row r with kept set S and pruned set P: w_S = w0_S + A_SS^-1 A_SP w0_P, A = H + dampening diag(H),
    the minimiser of (w - w0)^T A (w - w0) with w_P = 0 (what ADMM solves in its scaled coordinates)."""
    a = (hessian + dampening * torch.diag(torch.diagonal(hessian))).double()
    w0, out = dense.double(), torch.zeros(dense.shape, dtype=torch.float64)
    for r in range(dense.shape[0]):
        s, p = pruned[r] != 0, pruned[r] == 0
        out[r, s] = w0[r, s] + torch.linalg.solve(a[s][:, s], a[s][:, p] @ w0[r, p])
    return out.float()


@pytest.mark.parametrize("pruner", sorted(PRUNERS))
@pytest.mark.parametrize("name", sorted(UPDATES))
@pytest.mark.parametrize("fraction", [0.3, 0.7])
def test_every_update_keeps_the_pruners_zeros_exactly(pruner, name, fraction):
    w, sq_sum, hessian = _case()
    spec = _spec(pruner, name)
    k = int(fraction * w.numel())
    plain = _spec(pruner, "none").apply(w, _spec(pruner, "none").prepare(_Stats(sq_sum, hessian)), k)
    new = spec.apply(w, spec.prepare(_Stats(sq_sum, hessian)), k)
    assert new.dtype == torch.float32 and new.shape == w.shape
    assert torch.equal(new == 0, plain == 0) and int((new == 0).sum()) == k


@pytest.mark.parametrize("name", sorted(UPDATES))
@pytest.mark.parametrize("nm", [(2, 4), (4, 8)])
def test_every_update_keeps_n_of_m(name, nm):
    w, sq_sum, hessian = _case()
    spec = _spec("wanda", name, NM(*nm))
    new = spec.apply(w, spec.prepare(_Stats(sq_sum, hessian)), 0)
    assert is_nm(new, *nm) and int((new == 0).sum()) == w.numel() * nm[0] // nm[1]


@pytest.mark.parametrize("pruner", ["magnitude", "wanda", "sparsegpt"])
def test_admm_reaches_the_least_squares_optimum_on_the_mask(pruner):
    """On a known case: no update < OBS on the given mask < ADMM ~= the exact per-row solution (within 0.5 %)."""
    w, sq_sum, hessian = _case()
    k = w.numel() // 2
    pruned = _spec(pruner, "none").apply(w, _spec(pruner, "none").prepare(_Stats(sq_sum, hessian)), k)
    errors = {}
    for name in ("none", "sparsegpt", "admm"):
        spec = _spec(pruner, name)
        errors[name] = reconstruction_error(w, spec.update.apply(w, pruned, spec.update.prepare(hessian, spec.update_options),
                                                                 spec.update_options), hessian)
    optimum = reconstruction_error(w, _exact(w, pruned, hessian, ADMMOptions().dampening), hessian)
    assert errors["admm"] <= optimum * 1.005
    assert errors["admm"] < errors["sparsegpt"] <= errors["none"] * 1.0001
    if pruner != "sparsegpt":  # SparseGPT's own weights already carry the OBS update
        assert errors["admm"] < 0.8 * errors["none"]


def test_admm_converges_from_any_start_on_the_same_mask():
    """Convex problem: the masked dense weights and the OBS-updated ones as starts give the same answer."""
    w, _, hessian = _case(seed=3)
    prepared = update.scaled_hessian(hessian, 0.01)
    mask = torch.rand(w.shape, generator=torch.Generator().manual_seed(1)) < 0.6
    starts = [w.masked_fill(mask, 0.0), update._obs(w, w.masked_fill(mask, 0.0), update._factor(hessian, SparseGPTOptions()),
                                                     SparseGPTOptions())]
    a, b = (update.admm(w, s, prepared, iterations=60) for s in starts)
    assert torch.equal(a == 0, mask) and torch.equal(b == 0, mask)
    assert float((a - b).abs().max()) < 1e-3 * float(w.abs().max())


def test_a_dead_input_is_harmless():
    """An input that is always zero (H_jj = 0): finite weights, zeros kept, its kept weights left near the dense ones."""
    w, _, hessian = _case()
    hessian[7, :] = 0
    hessian[:, 7] = 0
    pruned = w.masked_fill(torch.rand(w.shape, generator=torch.Generator().manual_seed(2)) < 0.5, 0.0)
    new = update.admm(w, pruned, update.scaled_hessian(hessian, 0.01))
    assert bool(torch.isfinite(new).all()) and torch.equal(new == 0, pruned == 0)


def test_the_update_decides_the_calibration_statistic():
    assert _spec("magnitude", "none").statistic == Statistic.NOTHING
    assert _spec("wanda", "none").statistic == Statistic.NORMS
    assert _spec("wanda", "admm").statistic == Statistic.HESSIAN
    assert _spec("magnitude", "sparsegpt").statistic == Statistic.HESSIAN


class _Stats:
    def __init__(self, sq_sum, hessian):
        self.sq_sum, self.hessian = sq_sum, hessian
