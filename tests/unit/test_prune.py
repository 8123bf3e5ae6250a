"""The pruners of the PRUNERS table, one matrix at a time: exact counts, N:M validity, what each reads."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from absorbdeploy.masks import is_nm
from absorbdeploy.prune import PRUNERS, Prepared, relative_error
from absorbdeploy.prune_plan import PruneSpec
from absorbdeploy.recipe import NM, Prune, SparseGPTOptions


def _stats(columns: int, seed: int):
    x = torch.randn(64, columns, generator=torch.Generator().manual_seed(seed))
    return x.square().sum(0), x.T @ x


def _run(name, w, k, nm=None, seed=0):
    pruner = PRUNERS[name]
    options = SparseGPTOptions() if pruner.options else None
    sq_sum, hessian = _stats(w.shape[1], seed)
    prepared = pruner.prepare(sq_sum, hessian, options)
    return pruner.prune(w, prepared, k, nm, options)


@settings(max_examples=40, deadline=None)
@given(name=st.sampled_from(sorted(PRUNERS)), rows=st.integers(1, 24), columns=st.integers(1, 40),
       fraction=st.floats(0, 1), seed=st.integers(0, 10**6))
def test_every_pruner_prunes_exactly_k_weights(name, rows, columns, fraction, seed):
    w = torch.randn(rows, columns, generator=torch.Generator().manual_seed(seed))
    k = int(fraction * rows * columns)
    new = _run(name, w, k, seed=seed)
    assert new.dtype == torch.float32 and new.shape == w.shape
    assert int((new == 0).sum()) == k


@pytest.mark.parametrize("name", sorted(PRUNERS))
@pytest.mark.parametrize("nm", [(2, 4), (1, 4), (4, 8)])
def test_every_pruner_honours_n_of_m(name, nm):
    w = torch.randn(6, 32, generator=torch.Generator().manual_seed(1))
    new = _run(name, w, 0, nm=NM(*nm))
    assert is_nm(new, *nm) and int((new == 0).sum()) == 6 * 32 * nm[0] // nm[1]


def test_wanda_reads_the_input_norms_magnitude_does_not():
    w = torch.ones(2, 4)
    sq_sum = torch.tensor([1.0, 100.0, 100.0, 100.0])  # input 0 is nearly silent: Wanda prunes its weights first
    prepared = PRUNERS["wanda"].prepare(sq_sum, None, None)
    new = PRUNERS["wanda"].prune(w, prepared, 2, None, None)
    assert new[:, 0].tolist() == [0.0, 0.0] and bool((new[:, 1:] == 1).all())
    w = torch.tensor([[0.1, 2.0, 3.0, 4.0], [5.0, 0.2, 6.0, 7.0]])
    new = PRUNERS["magnitude"].prune(w, PRUNERS["magnitude"].prepare(None, None, None), 2, None, None)
    assert new[0, 0] == 0 and new[1, 1] == 0 and int((new == 0).sum()) == 2


def test_sparsegpt_updates_the_kept_weights_and_lowers_the_error():
    """With correlated inputs the OBS update moves the kept weights and beats Wanda's masked error on the same data."""
    g = torch.Generator().manual_seed(0)
    base = torch.randn(256, 8, generator=g)
    x = torch.cat([base, base + 0.05 * torch.randn(256, 8, generator=g)], 1)  # pairs of nearly equal inputs
    w = torch.randn(16, 16, generator=g)
    sq_sum, hessian = x.square().sum(0), x.T @ x
    options = SparseGPTOptions()
    obs = PRUNERS["sparsegpt"].prune(w, PRUNERS["sparsegpt"].prepare(sq_sum, hessian, options), 128, None, options)
    wanda = PRUNERS["wanda"].prune(w, PRUNERS["wanda"].prepare(sq_sum, None, None), 128, None, None)
    kept = obs != 0
    assert not torch.equal(obs[kept], w[kept])
    error = lambda new: float(((x @ (new - w).T) ** 2).sum())  # noqa: E731
    assert error(obs) < error(wanda)


def test_relative_error_is_the_diagonal_model_output_error():
    old = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    new = torch.tensor([[0.0, 2.0], [3.0, 0.0]])
    nu = torch.tensor([2.0, 1.0])
    assert relative_error(old, new, nu) == pytest.approx((1 * 2 + 16 * 1) / (1 * 2 + 4 + 9 * 2 + 16))
    assert relative_error(old, old, nu) == 0.0 and relative_error(old, new, None) is None


def test_each_pruner_declares_what_it_reads_and_its_options():
    assert {name: p.needs for name, p in PRUNERS.items()} == {"magnitude": "nothing", "wanda": "norms", "sparsegpt": "hessian"}
    spec = PruneSpec.of(Prune(method="sparsegpt", sparsity=0.5, structure=NM(2, 4)))
    assert spec.options == SparseGPTOptions() and spec.nm == (2, 4)
    assert PruneSpec.of(Prune(method="wanda", sparsity=0.5)).options is None
    assert isinstance(PRUNERS["magnitude"].prepare(None, None, None), Prepared)
