"""Calibration on the tiny model: the statistics hooks sum exactly what they claim, Linears that share an input share
one statistics object, and running blocks one at a time reproduces the model's own forward."""

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


def test_dense_profile_keeps_the_probe_states_it_was_asked_for(tiny_runner):
    profile = calibrate.dense_profile(tiny_runner, IDS, with_hessian=True, probe=(2, 8))
    assert len(profile.stats) == len(tiny_runner.blocks) and len(profile.probe_hidden) == len(tiny_runner.blocks) + 1
    assert all(h.shape == (2, 8, 128) for h in profile.probe_hidden)
    assert profile.stats[0]["self_attn.q_proj"].hessian.shape == (128, 128)


@pytest.mark.parametrize("method", sorted(ALLOCATORS))
def test_block_scores_follow_the_allocator_table(tiny_runner, method):
    profile = calibrate.dense_profile(tiny_runner, IDS, with_hessian=False, probe=None)
    allocator = ALLOCATORS[method]
    scores = calibrate.block_scores(tiny_runner, allocator, profile.stats, getattr(Allocation(), method, None))
    if allocator.score is None:
        assert scores is None
    else:
        assert len(scores) == len(tiny_runner.blocks) and all(s == s for s in scores)
