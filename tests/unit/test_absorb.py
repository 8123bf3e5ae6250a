"""The absorption math on hand-built blocks (pure functions; no model)."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from absorbdeploy import absorb, allocate

D = 16  # hidden size of the toy: coordinates 0..7 carry the signal, 8..15 the perturbation


def toy_blocks(gains, saturate=None):
    """Block k multiplies the perturbation coordinates by gains[k] (tanh-saturated above `saturate` if given) and adds
    a constant to the signal coordinates; the dense trajectory has zero perturbation coordinates."""

    def block(k):
        def fn(h):
            out = h.clone()
            out[..., :8] = h[..., :8] + 0.1
            p = gains[k] * h[..., 8:]
            out[..., 8:] = saturate * torch.tanh(p / saturate) if saturate else p
            return out
        return fn

    return [block(k) for k in range(len(gains))]


def dense_states(blocks, tokens=6):
    h = torch.zeros(2, tokens, D)
    h[..., :8] = 3.0
    states = [h]
    for b in blocks:
        states.append(b(states[-1]))
    return states


def perturbation(scale=1.0, tokens=6):
    delta = torch.zeros(2, tokens, D)
    delta[..., 8:] = scale
    return delta


def drift_matrix(blocks, states, eps, scale=1.0):
    return [absorb.propagate(blocks, states, perturbation(scale), l, eps, 1)["rel"] for l in range(len(blocks))]


def test_gain_and_composed_follow_the_blocks_that_amplify_and_absorb():
    # blocks 0-3 amplify (x2), blocks 4-5 absorb (x0.5): an error injected later skips more of the amplifiers
    gains = [2.0, 2.0, 2.0, 2.0, 0.5, 0.5]
    blocks = toy_blocks(gains)
    states = dense_states(blocks)
    drift = {1.0: drift_matrix(blocks, states, 1.0)}
    a = absorb.coefficients("gain", drift, 1.0, 0.01)
    assert a[-1] == 0.0
    assert a[0] < a[1] < a[2] < a[3], a  # rising with depth through the amplifying prefix
    assert a[3] == max(a) and a[3] > 0 > a[0]  # block 3's error meets only absorbing blocks; block 0's is amplified
    # the relative drift also shrinks a little with depth because the signal norm grows (+0.1 per block)
    pruned = [lambda h, b=b: b(h + perturbation() * 0.1) for b in blocks]
    logs = absorb.composed_gains(blocks, pruned, states, 1)
    b = absorb.coefficients("composed", None, 1.0, 0.01, logs)
    assert b[-1] == 0.0 and b[0] < b[1] < b[2] < b[3] and b[3] == max(b)


def test_margin_is_positive_only_where_saturating_blocks_follow():
    gains = [1.0, 1.0, 1.0, 1.0]
    linear = toy_blocks(gains)
    saturating = toy_blocks(gains, saturate=0.5)
    for blocks, expect_positive in ((linear, False), (saturating, True)):
        states = dense_states(blocks)
        drift = {eps: drift_matrix(blocks, states, eps, 2.0) for eps in (0.01, 1.0)}
        c = absorb.coefficients("margin", drift, 1.0, 0.01)
        assert c[-1] == 0.0
        if expect_positive:
            assert all(x > 0.05 for x in c[:-1]), c  # large errors are squashed, small ones pass linearly
        else:
            assert all(abs(x) < 1e-9 for x in c), c


def test_token_metrics_skip_the_first_tokens():
    dense = torch.ones(1, 3, 4)
    perturbed = dense.clone()
    perturbed[0, 0] += 100.0  # only the attention-sink position moves
    rel, cos, ab = absorb.token_metrics(perturbed, dense, 1)
    assert rel == 0.0 and cos == pytest.approx(1.0) and ab == 0.0
    rel, _, ab = absorb.token_metrics(perturbed, dense, 0)
    assert rel == pytest.approx(100.0 / 3) and ab == pytest.approx(200.0 / 3)  # |(100, 100, 100, 100)| = 200


def test_metrics_are_invariant_to_probe_batch_order():
    g = torch.Generator().manual_seed(0)
    dense, perturbed = torch.randn(5, 7, 8, generator=g), torch.randn(5, 7, 8, generator=g)
    order = torch.randperm(5, generator=g)
    a = absorb.token_metrics(perturbed, dense, 1)
    b = absorb.token_metrics(perturbed[order], dense[order], 1)
    assert a == pytest.approx(b, rel=1e-12)


@settings(max_examples=100, deadline=None)
@given(n=st.integers(2, 30), target=st.floats(0.3, 0.8), strength=st.floats(0, 0.15), seed=st.integers(0, 10**6),
       mode=st.sampled_from(["additive", "multiplicative"]))
def test_correction_keeps_the_exact_budget_and_strength_zero_is_identity(n, target, strength, seed, mode):
    g = torch.Generator().manual_seed(seed)
    params = torch.randint(1000, 5000, (n,), generator=g).tolist()
    base = allocate.project((target + 0.1 * (torch.rand(n, generator=g) - 0.5)).tolist(), params, target, 0.05, 0.95)
    coeffs = torch.randn(n, generator=g).tolist()
    assert absorb.correct(base, coeffs, params, target, 0.0, mode, 0.05, 0.95) == base
    out = absorb.correct(base, coeffs, params, target, strength, mode, 0.05, 0.95)
    assert sum(s * p for s, p in zip(out, params)) / sum(params) == pytest.approx(target, abs=1e-9)
    assert all(0.05 - 1e-12 <= s <= 0.95 + 1e-12 for s in out)
    counts = allocate.integer_counts(out, [[p] for p in params], target)
    assert sum(c[0] for c in counts) == round(target * sum(params))


def test_correction_moves_sparsity_toward_absorbing_blocks():
    base, params = [0.7] * 4, [100] * 4
    out = absorb.correct(base, [-1.0, 0.0, 1.0, 2.0], params, 0.7, 0.05, "additive", 0.05, 0.95)
    assert out == sorted(out) and out[-1] - out[0] == pytest.approx(0.1)
    out = absorb.correct(base, [2.0, 1.0, 0.0, -1.0], params, 0.7, 0.05, "multiplicative", 0.05, 0.95)
    assert out == sorted(out, reverse=True) and math.isclose(sum(out) / 4, 0.7)


def test_every_definition_declares_what_it_measures():
    for name, definition in absorb.DEFINITIONS.items():
        eps = definition.eps(1.0, 0.01)
        assert definition.composed or eps, name
    assert absorb.DEFINITIONS["margin"].eps(1.0, 0.01) == [0.01, 1.0]
    assert absorb.DEFINITIONS["composed"].composed and not absorb.DEFINITIONS["gain"].composed
    assert set(absorb.CORRECTIONS) == {"additive", "multiplicative"}


def test_paper_definition_clips_at_ln3_and_is_added_raw():
    gains = [3.0, 2.0, 0.5, 0.5, 0.5, 0.5]  # strong amplification early: ln G beyond ln 3 is clipped
    blocks = toy_blocks(gains)
    states = dense_states(blocks)
    drift = {1.0: drift_matrix(blocks, states, 1.0)}
    paper = absorb.coefficients("paper", drift, 1.0, 0.01)
    gain = absorb.coefficients("gain", drift, 1.0, 0.01)
    bound = math.log(3)
    assert paper == pytest.approx([max(-bound, min(bound, g)) for g in gain])
    assert max(gain) > bound and max(paper) == pytest.approx(bound)  # an absorption beyond 3x is clipped
    d = absorb.DEFINITIONS["paper"]
    assert d.perturbation == "gaussian" and not d.scaled and d.mode == "additive"
    base, params = [0.5] * 4, [1, 1, 1, 1]
    coeffs = [0.4, -0.4, 0.2, -0.2]
    out = absorb.correct(base, coeffs, params, 0.5, 0.1, "additive", 0.0, 0.99, scaled=False)
    assert out == pytest.approx([0.5 + 0.1 * c for c in coeffs])  # lam (alpha - mean alpha), mean 0


def test_a_horizon_measures_gain_to_the_last_block_followed():
    blocks = toy_blocks([2.0, 2.0, 2.0, 0.5, 0.5, 0.5])
    states = dense_states(blocks)
    full = drift_matrix(blocks, states, 1.0)
    cut = [{k: v for k, v in row.items() if k - l <= 2} for l, row in enumerate(full)]
    a = absorb.coefficients("gain", {1.0: cut}, 1.0, 0.01)
    assert a == pytest.approx([-math.log(cut[l][max(cut[l])] / cut[l][l]) for l in range(6)])
    assert a[0] < 0 < a[3]  # block 0's error still meets amplifiers within 2 blocks; block 3's only absorbers


def test_interpolate_fills_skipped_blocks_linearly_in_depth():
    assert absorb.interpolate([1.0, None, None, 4.0, None]) == pytest.approx([1.0, 2.0, 3.0, 4.0, 4.0])
    assert absorb.interpolate([None, 2.0, 0.0]) == [2.0, 2.0, 0.0]  # an end holds its nearest measured block
    with pytest.raises(ValueError, match="no block was measured"):
        absorb.interpolate([None, None])


def test_a_skipped_injection_block_gets_its_neighbours_mean():
    blocks = toy_blocks([2.0, 2.0, 2.0, 0.5, 0.5, 0.5])
    states = dense_states(blocks)
    full = {e: drift_matrix(blocks, states, e) for e in (0.01, 1.0)}
    strided = {e: [row if l % 2 == 0 or l == 5 else {} for l, row in enumerate(rows)] for e, rows in full.items()}
    for name in ("gain", "margin", "paper"):
        a = absorb.coefficients(name, full, 1.0, 0.01)
        b = absorb.coefficients(name, strided, 1.0, 0.01)
        assert [b[l] for l in (0, 2, 4, 5)] == pytest.approx([a[l] for l in (0, 2, 4, 5)])
        assert [b[1], b[3]] == pytest.approx([(a[0] + a[2]) / 2, (a[2] + a[4]) / 2])
