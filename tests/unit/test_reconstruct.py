"""Local reconstruction of a pruned block: the zeros never move, the block gets closer to the dense block's outputs on
its calibration inputs, the rest of the block is untouched, and a bf16 block is fitted in fp32 and returned in bf16."""

import warnings

import pytest
import torch

from absorbdeploy import calibrate
from absorbdeploy.blocks import prunable_linears
from absorbdeploy.reconstruct import reconstruct
from absorbdeploy.tiny import build_tiny_llama

IDS = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reconstruction_keeps_the_mask_and_lowers_the_block_error(dtype):
    model, _ = build_tiny_llama()
    model.to(dtype)
    blocks = list(model.model.layers)
    runner = calibrate.BlockRunner(model, blocks, batch_size=2)
    block = blocks[1]
    hidden = runner.run(blocks[0], runner.embed(IDS))
    target = runner.run(block, hidden)
    others = {n: p.detach().clone() for n, p in block.named_parameters() if "proj" not in n}
    g = torch.Generator().manual_seed(1)
    for _, m in prunable_linears(block):
        m.weight.data.masked_fill_(torch.rand(m.weight.shape, generator=g) < 0.6, 0.0)
    zeros = [m.weight == 0 for _, m in prunable_linears(block)]

    def error():
        return float((runner.run(block, hidden) - target).square().sum() / (target - hidden).square().sum())

    before = error()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a user's run prints nothing from here (no grad-to-scalar warning)
        fit = reconstruct(block, hidden, target, runner.block_kwargs, steps=60, lr=1e-3, batch_size=2)
    after = error()
    assert after < 0.7 * before, (before, after)
    assert fit["loss_last"] < fit["loss_first"]
    assert all(torch.equal(m.weight == 0, z) for (_, m), z in zip(prunable_linears(block), zeros))
    assert all(p.dtype == dtype and p.grad is None for p in block.parameters())
    assert all(torch.equal(p, others[n]) for n, p in block.named_parameters() if n in others)


def test_the_sequential_driver_reconstructs_every_block_with_exact_counts(tiny):
    from absorbdeploy import prune_blocks
    from absorbdeploy.prune import PRUNERS
    from absorbdeploy.prune_plan import PruneSpec
    from absorbdeploy.recipe import ReconstructOptions

    model, _ = tiny
    blocks = list(model.model.layers)
    runner = calibrate.BlockRunner(model, blocks, batch_size=2)
    counts = prune_blocks.plan_counts(blocks, [0.5] * 4, 0.5)
    records = prune_blocks.prune_sequential(runner, IDS, counts, PruneSpec(PRUNERS["wanda"]),
                                            reconstruct=ReconstructOptions(steps=5, lr=1e-3, batch_size=2))
    assert all(r.zeros == r.target_zeros for r in records)
    fitted = [r for r in records if r.reconstruction]
    assert [r.block for r in fitted] == [0, 1, 2, 3] and all(r.reconstruction["loss_last"] >= 0 for r in fitted)
