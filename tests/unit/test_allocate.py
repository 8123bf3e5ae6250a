import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from absorbdeploy import allocate

sizes = st.lists(st.lists(st.integers(1, 5000), min_size=1, max_size=7), min_size=2, max_size=24)


def weighted(values, weights):
    return sum(v * w for v, w in zip(values, weights)) / sum(weights)


@settings(max_examples=200, deadline=None)
@given(matrix_sizes=sizes, target=st.floats(0.05, 0.95), spread=st.floats(0, 0.6), seed=st.integers(0, 10**6),
       low=st.floats(0.0, 0.5), width=st.floats(0.05, 0.99))
def test_projection_and_integer_counts_hit_the_budget_to_the_weight(matrix_sizes, target, spread, seed, low, width):
    high = min(low + width, 0.999)
    assume(low <= target <= high)
    g = torch.Generator().manual_seed(seed)
    raw = (target + spread * (torch.rand(len(matrix_sizes), generator=g) - 0.5)).tolist()
    params = [sum(m) for m in matrix_sizes]
    projected = allocate.project(raw, params, target, low, high)
    assert all(low - 1e-12 <= s <= high + 1e-12 for s in projected)
    assert weighted(projected, params) == pytest.approx(target, abs=1e-9)
    counts = allocate.integer_counts(projected, matrix_sizes, target)
    assert sum(map(sum, counts)) == round(target * sum(params))
    assert all(0 <= c <= n for row, ns in zip(counts, matrix_sizes) for c, n in zip(row, ns))
    for row, ns, s in zip(counts, matrix_sizes, projected):  # each matrix within one weight of its exact share
        for c, n in zip(row, ns):
            assert abs(c - s * n) <= 1 + 1e-6 * n


@settings(max_examples=100, deadline=None)
@given(ratios=st.lists(st.floats(0, 20), min_size=2, max_size=40), lam=st.floats(0, 0.2), target=st.floats(0.3, 0.7))
def test_owl_spread_is_two_lambda_and_mean_is_kept(ratios, lam, target):
    assume(max(ratios) - min(ratios) > 1e-6)
    s = allocate.owl(ratios, target, lam)
    assert max(s) - min(s) == pytest.approx(2 * lam, abs=1e-9)
    assert sum(s) / len(s) == pytest.approx(target, abs=1e-9)
    # more outliers, less sparsity
    order = sorted(range(len(ratios)), key=lambda i: ratios[i])
    assert all(s[order[i]] >= s[order[i + 1]] - 1e-12 for i in range(len(order) - 1))


@settings(max_examples=100, deadline=None)
@given(alphas=st.lists(st.floats(1.5, 8), min_size=2, max_size=32), eps=st.floats(0.01, 0.5), target=st.floats(0.3, 0.8),
       params=st.integers(100, 10000))
def test_alpha_pruning_gives_more_sparsity_to_higher_alpha(alphas, eps, target, params):
    assume(max(alphas) - min(alphas) > 1e-6)
    p = [params] * len(alphas)
    s = allocate.alpha_pruning(alphas, p, target, eps)
    assert weighted(s, p) == pytest.approx(target, rel=1e-9)
    hi, lo = alphas.index(max(alphas)), alphas.index(min(alphas))
    assert s[hi] > s[lo]
    assert s[hi] / s[lo] == pytest.approx((1 + eps) / (1 - eps), rel=1e-9)


def test_alpha_pruning_is_parameter_weighted():
    s = allocate.alpha_pruning([2.0, 4.0], [3000, 1000], 0.5, 0.2)
    assert weighted(s, [3000, 1000]) == pytest.approx(0.5)
    assert sum(s) / 2 != pytest.approx(0.5)


def test_dlp_gives_more_sparsity_to_blocks_with_larger_scores():
    s = allocate.dlp([1.0, 2.0, 4.0, 8.0], 0.7, 0.15)
    assert s == sorted(s) and max(s) - min(s) == pytest.approx(0.3)
    assert sum(s) / 4 == pytest.approx(0.7)


def test_atp_is_an_arithmetic_progression_centred_on_the_target():
    s = allocate.atp(5, 0.6, 0.02)
    assert [round(b - a, 12) for a, b in zip(s, s[1:])] == [0.02] * 4 and sum(s) / 5 == pytest.approx(0.6)
    default = allocate.atp(30, 0.7, None)
    assert default[-1] - default[0] == pytest.approx(29 * 0.5 * allocate.atp_max_beta(30, 0.7))
    assert 0 <= min(default) and max(default) <= 1


def test_projection_clips_then_keeps_the_budget():
    s = allocate.project([0.2, 0.9, 0.99, 0.99], [1, 1, 1, 1], 0.8, 0.05, 0.95)
    assert max(s) == pytest.approx(0.95) and sum(s) / 4 == pytest.approx(0.8)


def test_outlier_ratio_counts_the_whole_block():
    scores = [torch.tensor([1.0, 1.0, 1.0, 100.0]), torch.tensor([1.0, 1.0, 1.0, 1.0])]
    # mean = 13.375; one of eight scores exceeds 5 x mean? 100 > 66.9 -> 12.5 %
    assert allocate.owl_outlier_ratio(scores, 5) == pytest.approx(12.5)
    assert allocate.mean_score(scores) == pytest.approx(107 / 8)


def test_uniform_counts_are_exact_for_unequal_blocks():
    sizes = [[7, 13], [1000], [3, 3, 3]]
    counts = allocate.integer_counts([0.3, 0.5, 0.7], sizes, 0.5)
    total = sum(map(sum, sizes))
    assert sum(map(sum, counts)) == round(0.5 * total) == 514
    assert counts[1] == [500] and all(0 <= c <= n for row, ns in zip(counts, sizes) for c, n in zip(row, ns))


@pytest.mark.parametrize("method", sorted(allocate.ALLOCATORS))
def test_every_allocator_lands_on_the_exact_budget(method):
    from absorbdeploy.recipe import Allocation

    entry, options = allocate.ALLOCATORS[method], getattr(Allocation(), method, None)
    params = [1000, 2000, 1500, 1000, 3000]
    scores = None if entry.score is None else [3.0, 1.0, 4.0, 1.5, 9.0]
    s = allocate.base_allocation(method, scores, params, 0.6, options, 0.05, 0.95)
    assert sum(x * n for x, n in zip(s, params)) / sum(params) == pytest.approx(0.6, abs=1e-9)
    assert all(0.05 <= x <= 0.95 for x in s)
    assert (max(s) - min(s) < 1e-12) == (not entry.varies)


def test_score_functions_read_block_tensors():
    weights = [torch.tensor([[1.0, 0.0], [0.0, 10.0]]), torch.ones(2, 2)]
    norms = [torch.tensor([1.0, 1.0]), torch.tensor([1.0, 1.0])]
    owl, dlp = allocate.ALLOCATORS["owl"], allocate.ALLOCATORS["dlp"]
    assert owl.needs_norms and dlp.needs_norms and not allocate.ALLOCATORS["alpha"].needs_norms
    assert owl.score(weights, norms, type("O", (), {"m": 2.0})) == pytest.approx(12.5)  # 10 > 2 x mean (14/8)
    assert dlp.score(weights, norms, None) == pytest.approx(15 / 8)
