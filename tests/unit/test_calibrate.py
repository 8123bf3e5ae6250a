"""Calibration on the tiny model: the statistics hooks sum exactly what they claim, Linears that share an input share
one statistics object, and running blocks one at a time reproduces the model's own forward."""

import dataclasses

import pytest
import torch

from absorbdeploy import calibrate
from absorbdeploy.allocate import ALLOCATORS
from absorbdeploy.blocks import prunable_linears
from absorbdeploy.recipe import Allocation


@pytest.fixture(scope="module")
def tiny_runner():
    from absorbdeploy.tiny import build_tiny_llama

    model, _ = build_tiny_llama()
    return calibrate.BlockRunner(model, list(model.model.layers), batch_size=3)


IDS = torch.randint(0, 256, (5, 16), generator=torch.Generator().manual_seed(0))


def test_input_stats_sum_squares_and_outer_products():
    x = torch.randn(2, 7, 5, generator=torch.Generator().manual_seed(1))
    stats = calibrate.InputStats.empty(5, torch.device("cpu"), with_hessian=True)
    stats.add(x[:1])
    stats.add(x[1:])
    rows = x.reshape(-1, 5)
    assert torch.allclose(stats.sq_sum, rows.square().sum(0)) and torch.allclose(stats.hessian, rows.T @ rows, atol=1e-5)
    assert stats.tokens == 14 and torch.allclose(stats.col_norm, rows.norm(dim=0))


def test_blocks_run_one_at_a_time_reproduce_the_forward(tiny_runner):
    hidden = tiny_runner.embed(IDS)
    for block in tiny_runner.blocks:
        hidden = tiny_runner.run(block, hidden)
    with torch.no_grad():
        expected = tiny_runner.model(input_ids=IDS, output_hidden_states=True, use_cache=False).hidden_states[-1]
    final = tiny_runner.model.model.norm(hidden)
    assert torch.allclose(final, expected, atol=1e-5)


def test_hooks_count_every_token_and_share_stats_per_input(tiny_runner):
    hidden = tiny_runner.embed(IDS)
    block = tiny_runner.blocks[0]
    _, stats = calibrate.collect_stats(tiny_runner, block, hidden, with_hessian=False)
    names = [n for n, _ in prunable_linears(block)]
    assert set(stats) == set(names)
    assert stats["self_attn.q_proj"] is stats["self_attn.k_proj"] is stats["self_attn.v_proj"]
    assert stats["mlp.gate_proj"] is stats["mlp.up_proj"] and stats["mlp.down_proj"] is not stats["mlp.up_proj"]
    assert stats["self_attn.q_proj"].tokens == IDS.numel()
    normed = block.input_layernorm(hidden)
    assert torch.allclose(stats["self_attn.q_proj"].sq_sum, normed.reshape(-1, normed.shape[-1]).square().sum(0), rtol=1e-4)


def _direct_inputs(model, ids) -> list[dict]:
    """Per block, {Linear name: every input row it received} from one ordinary forward of the whole model."""
    seen, handles = [{} for _ in model.model.layers], []
    for k, layer in enumerate(model.model.layers):
        for name, m in prunable_linears(layer):
            def hook(module, args, output, k=k, name=name):
                seen[k].setdefault(name, []).append(args[0].detach().reshape(-1, args[0].shape[-1]))

            handles.append(m.register_forward_hook(hook))
    try:
        with torch.no_grad():
            model(input_ids=ids, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return [{name: torch.cat(rows) for name, rows in block.items()} for block in seen]


@pytest.fixture(scope="module")
def profile(tiny_runner):
    return calibrate.dense_profile(tiny_runner, IDS, with_hessian=True, probe=(2, 8))


@pytest.fixture(scope="module")
def direct(tiny_runner):
    return _direct_inputs(tiny_runner.model, IDS)


def test_dense_profile_sums_exactly_the_inputs_each_linear_saw(profile, direct):
    """nu_j = sum_t x_tj^2 and H = X^T X of every Linear of every block, against the inputs captured by hooks on an
    ordinary forward of the whole model (not block by block, not in micro-batches)."""
    assert len(profile.stats) == len(direct) == 4
    for k, (stats, inputs) in enumerate(zip(profile.stats, direct)):
        assert set(stats) == set(inputs) and len(inputs) == 7
        for name, x in inputs.items():
            s = stats[name]
            assert s.tokens == IDS.numel() == x.shape[0], (k, name)
            assert torch.allclose(s.sq_sum, x.square().sum(0), rtol=1e-4, atol=1e-4), (k, name)
            gram = x.T @ x
            assert torch.allclose(s.hessian, gram, rtol=1e-4, atol=1e-4 * float(gram.abs().max())), (k, name)
            assert torch.allclose(s.col_norm, x.norm(dim=0), rtol=1e-4, atol=1e-5), (k, name)


def test_dense_profile_keeps_the_probe_states_it_was_asked_for(tiny_runner, profile):
    assert len(profile.probe_hidden) == len(tiny_runner.blocks) + 1
    assert all(h.shape == (2, 8, 128) for h in profile.probe_hidden)
    with torch.no_grad():
        states = tiny_runner.model(input_ids=IDS[:2, :8], output_hidden_states=True, use_cache=False).hidden_states
    assert torch.allclose(profile.probe_hidden[0], states[0], atol=1e-6)  # the embeddings
    assert torch.allclose(profile.probe_hidden[2], states[2], atol=1e-4)  # block 1's output (causal: a prefix is exact)


@pytest.mark.parametrize("method", sorted(ALLOCATORS))
def test_block_scores_give_each_allocator_its_blocks_weights_and_input_norms(tiny_runner, profile, direct, method):
    """The score function sees each block's Linear weights in module order and, when it reads them, the norms of the
    inputs those Linears received; block_scores returns its values in block order."""
    allocator, options = ALLOCATORS[method], getattr(Allocation(), method, None)
    if allocator.score is None:
        assert calibrate.block_scores(tiny_runner, allocator, profile.stats, options) is None
        return
    calls = []

    def recorder(weights, norms, opts):
        calls.append((weights, norms, opts))
        return 10.0 * len(calls)

    scores = calibrate.block_scores(tiny_runner, dataclasses.replace(allocator, score=recorder), profile.stats, options)
    assert scores == [10.0, 20.0, 30.0, 40.0]
    for k, (weights, norms, opts) in enumerate(calls):
        linears = prunable_linears(tiny_runner.blocks[k])
        assert opts is options and len(weights) == 7 and all(w is m.weight for w, (_, m) in zip(weights, linears))
        if allocator.needs_norms:
            expected = [direct[k][name].norm(dim=0) for name, _ in linears]
            assert all(torch.allclose(n, e, rtol=1e-4, atol=1e-5) for n, e in zip(norms, expected)), k
        else:
            assert norms is None


@pytest.mark.parametrize("method", ["owl", "dlp"])
def test_norm_reading_scores_equal_the_score_of_the_directly_measured_norms(tiny_runner, profile, direct, method):
    allocator, options = ALLOCATORS[method], getattr(Allocation(), method)
    scores = calibrate.block_scores(tiny_runner, allocator, profile.stats, options)
    for k, block in enumerate(tiny_runner.blocks):
        linears = prunable_linears(block)
        norms = [direct[k][name].norm(dim=0) for name, _ in linears]
        assert scores[k] == pytest.approx(allocator.score([m.weight for _, m in linears], norms, options), rel=1e-3), k
    assert len(set(scores)) == len(scores)  # a signal that tells the blocks apart
