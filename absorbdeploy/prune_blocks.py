"""Stage 6, prune: drive every decoder block through a pruner (prune.PRUNERS) and an update (update.UPDATES), with
exact counts.

Two drivers. `prune_sequential` is the anchors' protocol (pruning §1): block l is calibrated on the outputs of the
already pruned blocks 1..l-1 (one statistics forward of the dense block, prune, one forward of the pruned block to feed
block l+1). `prune_from_profile` prunes every block from the dense pass's statistics, with no further forward (pruning
§8.1 b). Either way each matrix ends with exactly its share from `plan_counts`, so the global sparsity over the decoder
Linears is round(S N) / N to the weight. `commit(k)` is called once block k is final (streaming writes it to disk then).
"""

from dataclasses import replace

from absorbdeploy.allocate import integer_counts
from absorbdeploy.blocks import matrix_sizes, prunable_linears
from absorbdeploy.calibrate import BlockRunner, collect_stats
from absorbdeploy.prune import MatrixRecord, Statistic, relative_error
from absorbdeploy.prune_plan import PruneSpec
from absorbdeploy.reconstruct import reconstruct as local_fit


def plan_counts(blocks, block_sparsities, target: float) -> list[dict[str, int]]:
    """Per block, {Linear name: weights to prune}; the total is round(target * N) exactly (allocate.integer_counts)."""
    counts = integer_counts(block_sparsities, matrix_sizes(blocks), target)
    return [dict(zip([n for n, _ in prunable_linears(b)], row)) for b, row in zip(blocks, counts)]


def prune_block(index: int, block, stats: dict | None, counts: dict[str, int], spec: PruneSpec) -> list[MatrixRecord]:
    """Prune every Linear of one block in place; `stats` maps a Linear's name to its calibrate.InputStats (or None)."""
    import torch

    records, prepared = [], {}
    for name, linear in prunable_linears(block):
        s = stats.get(name) if stats else None
        if id(s) not in prepared:  # Linears that share an input share its statistics object
            prepared[id(s)] = spec.prepare(s)
        ready = prepared[id(s)]
        w_old = linear.weight.data
        w_new = spec.apply(w_old, ready, counts[name])
        err = relative_error(w_old, w_new, s.sq_sum if s else None)
        linear.weight.data.copy_(w_new.to(w_old.dtype))
        zeros = int((linear.weight.data == 0).sum())
        records.append(MatrixRecord(index, name, w_old.numel(), counts[name], zeros, err, ready[0].dampening))
        del w_new
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return records


def prune_sequential(runner: BlockRunner, windows, counts, spec: PruneSpec, progress=None, commit=None,
                     reconstruct=None) -> list[MatrixRecord]:
    """The anchors' protocol: block l is calibrated on the outputs of the pruned blocks before it. `reconstruct`
    (prune.reconstruct options, or None) re-fits each pruned block to the dense block's outputs on the same inputs."""
    records = []
    hidden = runner.embed(windows)
    for index in range(len(runner.blocks)):
        with runner.block(index) as block:
            dense_out, stats = collect_stats(runner, block, hidden, spec.statistic == Statistic.HESSIAN)
            records += prune_block(index, block, stats, counts[index], spec)
            del stats
            if reconstruct is not None:
                fit = local_fit(block, hidden, dense_out, runner.block_kwargs, reconstruct.steps, reconstruct.lr,
                                reconstruct.batch_size, seed=index)
                records[-1] = replace(records[-1], reconstruction=fit)
            del dense_out
            if commit is not None:
                commit(index)
            if index + 1 < len(runner.blocks):
                hidden = runner.run(block, hidden)
        if progress:
            progress.advance(index + 1, len(runner.blocks))
    return records


def prune_from_profile(runner: BlockRunner, profile_stats, counts, spec: PruneSpec, progress=None,
                       commit=None) -> list[MatrixRecord]:
    """Every block from the one dense pass's statistics (`profile_stats[k]`, or None for magnitude)."""
    records = []
    for index in range(len(runner.blocks)):
        with runner.block(index) as block:
            records += prune_block(index, block, profile_stats[index] if profile_stats else None, counts[index], spec)
            if commit is not None:
                commit(index)
        if progress:
            progress.advance(index + 1, len(runner.blocks))
    return records
