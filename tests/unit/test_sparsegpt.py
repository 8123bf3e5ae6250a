import pytest
import torch

from absorbdeploy import masks, sparsegpt
from absorbdeploy.calibrate import InputStats


def correlated_inputs(tokens=2048, features=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    latent = torch.randn(tokens, 8, generator=g)
    mix = torch.randn(8, features, generator=g)
    return latent @ mix + 0.1 * torch.randn(tokens, features, generator=g)


def stats_for(x):
    s = InputStats.empty(x.shape[1], x.device, with_hessian=True)
    s.add(x)
    return s


def output_error(w, w_new, x):
    return float((x @ (w - w_new).T).square().sum() / (x @ w.T).square().sum())


@pytest.mark.parametrize("sparsity", [0.5, 0.7])
def test_sparsegpt_reconstructs_better_than_wanda_on_correlated_inputs(sparsity):
    x = correlated_inputs()
    w = torch.randn(48, 64, generator=torch.Generator().manual_seed(1))
    st = stats_for(x)
    k = int(sparsity * w.numel())
    upper, _ = sparsegpt.inverse_factor(st.hessian, 0.01)
    w_sgpt = sparsegpt.prune(w, upper, k=k, blocksize=16)
    w_wanda = w.masked_fill(masks.row_mask(masks.wanda_scores(w, st.col_norm), k), 0)
    assert int((w_sgpt == 0).sum()) == k == int((w_wanda == 0).sum())
    assert output_error(w, w_sgpt, x) < 0.7 * output_error(w, w_wanda, x)


def test_sparsegpt_two_four():
    x = correlated_inputs(features=32)
    w = torch.randn(16, 32, generator=torch.Generator().manual_seed(2))
    upper, _ = sparsegpt.inverse_factor(stats_for(x).hessian, 0.01)
    w_new = sparsegpt.prune(w, upper, nm=(2, 4), blocksize=8)
    assert masks.is_nm(w_new, 2, 4) and int((w_new == 0).sum()) == w.numel() // 2


def test_cholesky_failure_retries_with_ten_times_damping():
    # A Hessian with a large negative direction: 1 % damping cannot fix it, 10 % does.
    h = torch.eye(8, dtype=torch.float32)
    h[0, 0] = 10.0
    h[1, 1] = -0.5  # diag mean 1.94: damping 0.01 and 0.1 leave h11 negative, 1.0 makes it positive
    with pytest.raises(sparsegpt.HessianNotPositiveDefinite, match="not positive definite"):
        sparsegpt.inverse_factor(h, 0.01, retries=1)
    upper, damp = sparsegpt.inverse_factor(h, 0.01, retries=2)
    assert damp == pytest.approx(1.0) and torch.isfinite(upper).all()


def test_dead_inputs_do_not_break_the_factor():
    x = correlated_inputs(features=16)
    x[:, 3] = 0
    upper, damp = sparsegpt.inverse_factor(stats_for(x).hessian, 0.01)
    assert damp == 0.01 and torch.isfinite(upper).all()
