"""Driving the blocks through a pruner: exact per-matrix counts whose sum is the global budget, statistics prepared
once per shared input, commits in block order, and the two drivers' difference (sequential calibration sees the pruned
blocks before it; the dense-profile driver does not)."""

import dataclasses

import pytest
import torch

from absorbdeploy import calibrate, prune_blocks
from absorbdeploy.prune import PRUNERS, Statistic
from absorbdeploy.prune_blocks import PruneSpec

IDS = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(0))


def _linears(block):
    return [(n, m) for n, m in block.named_modules() if isinstance(m, torch.nn.Linear)]


def test_plan_counts_hit_the_global_budget_to_the_weight(tiny):
    model, _ = tiny
    blocks = list(model.model.layers)
    sizes = [{n: m.weight.numel() for n, m in _linears(b)} for b in blocks]
    total = sum(sum(s.values()) for s in sizes)
    for target, per_block in [(0.5, [0.3, 0.5, 0.5, 0.7]), (0.37, [0.37] * 4), (0.123, [0.1, 0.2, 0.1, 0.092])]:
        counts = prune_blocks.plan_counts(blocks, per_block, target)
        assert [set(c) for c in counts] == [set(s) for s in sizes]
        assert sum(sum(c.values()) for c in counts) == round(target * total), target
        for c, s, sparsity in zip(counts, sizes, per_block):
            assert all(abs(c[n] - sparsity * s[n]) <= 1 for n in s), (target, sparsity)  # each matrix its block's share


def test_magnitude_prunes_exactly_the_count_and_only_the_smallest(tiny):
    model, _ = tiny
    block = model.model.layers[1]
    before = {n: m.weight.detach().clone() for n, m in _linears(block)}
    counts = {n: (i + 1) * 997 for i, n in enumerate(before)}
    records = prune_blocks.prune_block(1, block, None, counts, PruneSpec(PRUNERS["magnitude"]))
    assert [(r.block, r.name, r.numel, r.target_zeros, r.zeros) for r in records] == \
           [(1, n, before[n].numel(), counts[n], counts[n]) for n in before]
    for name, m in _linears(block):
        w, old = m.weight.detach(), before[name]
        pruned, kept = old[w == 0].abs(), old[w != 0].abs()
        assert int((w == 0).sum()) == counts[name] and pruned.max() <= kept.min(), name
        assert torch.equal(w[w != 0], old[w != 0])  # magnitude changes nothing else


def test_statistics_are_prepared_once_per_shared_input_and_errors_use_them(tiny):
    model, _ = tiny
    block = model.model.layers[0]
    linears = dict(_linears(block))
    g = torch.Generator().manual_seed(1)
    shared = {}  # q/k/v read one input, gate/up another: one InputStats object each, as collect_stats shares them
    stats = {}
    for name, m in linears.items():
        group = "attn_in" if name.split(".")[-1] in ("q_proj", "k_proj", "v_proj") else \
                "mlp_in" if name.split(".")[-1] in ("gate_proj", "up_proj") else name
        if group not in shared:
            shared[group] = calibrate.InputStats(torch.rand(m.in_features, generator=g) + 0.1, None, 10)
        stats[name] = shared[group]
    calls = []
    wanda = PRUNERS["wanda"]
    counting = dataclasses.replace(wanda, prepare=lambda s, h, o: calls.append(s) or wanda.prepare(s, h, o))
    before = {n: m.weight.detach().clone() for n, m in linears.items()}
    counts = {n: m.weight.numel() // 2 for n, m in linears.items()}
    records = prune_blocks.prune_block(0, block, stats, counts, PruneSpec(counting))
    assert len(calls) == 4 and all(any(c is s.sq_sum for c in calls) for s in shared.values())
    for r in records:
        old, new, nu = before[r.name], linears[r.name].weight.detach(), stats[r.name].sq_sum
        assert r.zeros == counts[r.name] == int((new == 0).sum())
        expected = float(((old - new) ** 2 * nu).sum() / (old**2 * nu).sum())
        assert r.rel_error == pytest.approx(expected, rel=1e-5)


def test_from_profile_commits_every_block_in_order_and_reports_progress(tiny):
    model, _ = tiny
    blocks = list(model.model.layers)
    runner = calibrate.BlockRunner(model, blocks, batch_size=2)
    counts = prune_blocks.plan_counts(blocks, [0.5] * 4, 0.5)
    committed, advanced = [], []

    class Bar:
        def advance(self, done, total):
            advanced.append((done, total))

    records = prune_blocks.prune_from_profile(runner, None, counts, PruneSpec(PRUNERS["magnitude"]), Bar(),
                                              committed.append)
    assert committed == [0, 1, 2, 3] and advanced == [(1, 4), (2, 4), (3, 4), (4, 4)]
    zeros = sum(int((m.weight == 0).sum()) for b in blocks for _, m in _linears(b))
    assert zeros == sum(r.zeros for r in records) == sum(sum(c.values()) for c in counts)


def test_sequential_calibrates_each_block_on_the_pruned_blocks_before_it(tiny):
    """Block 0 sees the same input either way; from block 1 on, the sequential driver's statistics come from pruned
    blocks, so its masks differ from those of the dense pass's statistics."""
    from absorbdeploy.tiny import build_tiny_llama

    sequential, _ = tiny
    dense, _ = build_tiny_llama()
    spec = PruneSpec(PRUNERS["wanda"])
    assert spec.statistic == Statistic.NORMS
    masks = {}
    for name, model in (("sequential", sequential), ("dense", dense)):
        blocks = list(model.model.layers)
        runner = calibrate.BlockRunner(model, blocks, batch_size=2)
        counts = prune_blocks.plan_counts(blocks, [0.5] * 4, 0.5)
        if name == "sequential":
            prune_blocks.prune_sequential(runner, IDS, counts, spec)
        else:
            profile = calibrate.dense_profile(runner, IDS, with_hessian=False, probe=None)
            prune_blocks.prune_from_profile(runner, profile.stats, counts, spec)
        masks[name] = [torch.cat([m.weight.reshape(-1) == 0 for _, m in _linears(b)]) for b in blocks]
    assert torch.equal(masks["sequential"][0], masks["dense"][0])
    assert all(not torch.equal(s, d) for s, d in zip(masks["sequential"][1:], masks["dense"][1:]))


def test_an_update_keeps_the_masks_and_brings_each_block_closer_to_its_dense_outputs():
    """Sequential Wanda 60 % with and without the ADMM update on the same tiny model: the same zeros (the update never
    moves them, and block l's input differs only through the kept weights' values, so only block 0 is compared for
    masks), the same exact counts, and every block's output on its own calibration input closer to the dense block's."""
    from absorbdeploy.recipe import ADMMOptions
    from absorbdeploy.tiny import build_tiny_llama
    from absorbdeploy.update import UPDATES

    errors, zeros, masks = {}, {}, {}
    for name in ("none", "admm"):
        model, _ = build_tiny_llama()
        blocks = list(model.model.layers)
        dense = [{n: m.weight.detach().clone() for n, m in _linears(b)} for b in blocks]
        spec = PruneSpec(PRUNERS["wanda"], update=UPDATES[name], update_options=ADMMOptions() if name == "admm" else None)
        runner = calibrate.BlockRunner(model, blocks, batch_size=2)
        counts = prune_blocks.plan_counts(blocks, [0.6] * 4, 0.6)
        hidden, errors[name] = runner.embed(IDS), []
        for index, block in enumerate(blocks):
            target, stats = calibrate.collect_stats(runner, block, hidden, spec.statistic == Statistic.HESSIAN)
            records = prune_blocks.prune_block(index, block, stats, counts[index], spec)
            out = runner.run(block, hidden)
            errors[name].append(float((out - target).square().sum() / (target - hidden).square().sum()))
            hidden = out
        zeros[name] = [r.zeros for r in records]
        masks[name] = [m.weight == 0 for _, m in _linears(blocks[0])]
        assert all(r.zeros == r.target_zeros for r in records)
        assert not all(torch.equal(m.weight, dense[0][n]) for n, m in _linears(blocks[0]))
    assert all(torch.equal(a, b) for a, b in zip(masks["none"], masks["admm"]))
    assert zeros["none"] == zeros["admm"]
    assert all(a < n for a, n in zip(errors["admm"], errors["none"])), errors
