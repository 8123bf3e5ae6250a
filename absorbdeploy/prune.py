"""Stage 6, prune: apply magnitude, Wanda or SparseGPT to every Linear of every decoder block with exact counts.

Two drivers. `prune_sequential` is the anchors' protocol (pruning §1): block l is calibrated on the outputs of the already
pruned blocks 1..l-1 (one statistics forward of the dense block, prune, one forward of the pruned block to feed block
l+1). `prune_from_profile` prunes every block from the dense pass's statistics, with no further forward (pruning §8.1 b).
Either way each matrix ends with exactly the number of zeros `integer_counts` gave it, so the global sparsity over the
decoder Linears is round(S N) / N to the weight.
"""

from dataclasses import dataclass

from absorbdeploy import masks, sparsegpt
from absorbdeploy.allocate import integer_counts
from absorbdeploy.calibrate import BlockRunner, InputStats, collect_stats
from absorbdeploy.load import prunable_linears
from absorbdeploy.recipe import Prune, parse_nm


@dataclass(frozen=True)
class MatrixRecord:
    block: int
    name: str
    numel: int
    target_zeros: int
    zeros: int
    rel_error: float | None  # sum_j dW_rj^2 nu_j / sum_j W_rj^2 nu_j: the output error under a diagonal input model
    dampening: float | None = None  # SparseGPT: the dampening that gave a positive-definite Hessian


def matrix_sizes(blocks) -> list[list[int]]:
    return [[m.weight.numel() for _, m in prunable_linears(b)] for b in blocks]


def plan_counts(blocks, block_sparsities, target: float) -> list[dict[str, int]]:
    sizes = matrix_sizes(blocks)
    counts = integer_counts(block_sparsities, sizes, target)
    return [dict(zip([n for n, _ in prunable_linears(b)], row)) for b, row in zip(blocks, counts)]


def new_weight(weight, stats: InputStats | None, k: int, cfg: Prune, factors: dict):
    """The pruned weight (fp32) for one matrix: exactly k zeros, or N of every M along the input dimension."""
    nm = parse_nm(cfg.structure)
    if cfg.method == "sparsegpt":
        key = id(stats)
        if key not in factors:
            factors[key] = sparsegpt.inverse_factor(stats.hessian, cfg.sparsegpt.dampening)
        upper, damp = factors[key]
        return sparsegpt.prune(weight, upper, k=None if nm else k, nm=nm, blocksize=cfg.sparsegpt.blocksize), damp
    scores = masks.magnitude_scores(weight) if cfg.method == "magnitude" else masks.wanda_scores(weight, stats.col_norm)
    if nm:
        mask = masks.nm_mask(scores, *nm)
    elif cfg.method == "magnitude":
        mask = masks.smallest_k_mask(scores, k)
    else:
        mask = masks.row_mask(scores, k)
    return weight.float().masked_fill(mask, 0.0), None


def relative_error(old, new, stats: InputStats | None) -> float | None:
    if stats is None:
        return None
    nu = stats.sq_sum.to(old.device).unsqueeze(0)
    denominator = float((old.float().square() * nu).sum())
    return float(((old.float() - new).square() * nu).sum()) / denominator if denominator > 0 else 0.0


def prune_block(index: int, block, stats: dict[str, InputStats] | None, counts: dict[str, int], cfg: Prune) -> list[MatrixRecord]:
    import torch

    records, factors = [], {}
    for name, linear in prunable_linears(block):
        s = stats.get(name) if stats else None
        w_old = linear.weight.data
        w_new, damp = new_weight(w_old, s, counts[name], cfg, factors)
        err = relative_error(w_old, w_new, s)
        linear.weight.data.copy_(w_new.to(w_old.dtype))
        zeros = int((linear.weight.data == 0).sum())
        records.append(MatrixRecord(index, name, w_old.numel(), counts[name], zeros, err, damp))
        del w_new
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return records


def needs_statistics(cfg: Prune) -> bool:
    return cfg.method != "magnitude"


def prune_sequential(runner: BlockRunner, windows, plan, cfg: Prune, progress=None, commit_dtype: str | None = None) -> list[MatrixRecord]:
    """The anchors' protocol: block l is calibrated on the outputs of the pruned blocks before it. In streaming mode
    each pruned block is written to the output shards (in `commit_dtype`) before it is released."""
    records = []
    with_hessian = cfg.method == "sparsegpt"
    hidden = runner.embed(windows)
    for index in range(len(runner.blocks)):
        with runner.block(index) as block:
            _, stats = collect_stats(runner, block, hidden, with_hessian)
            records += prune_block(index, block, stats, plan[index], cfg)
            del stats
            if runner.store is not None:
                runner.store.commit(index, commit_dtype)
            if index + 1 < len(runner.blocks):
                hidden = runner.run(block, hidden)
        if progress:
            progress.advance(index + 1, len(runner.blocks))
    return records


def prune_from_profile(runner: BlockRunner, profile_stats, plan, cfg: Prune, progress=None, commit_dtype: str | None = None) -> list[MatrixRecord]:
    records = []
    for index in range(len(runner.blocks)):
        with runner.block(index) as block:
            records += prune_block(index, block, profile_stats[index] if profile_stats else None, plan[index], cfg)
            if runner.store is not None:
                runner.store.commit(index, commit_dtype)
        if progress:
            progress.advance(index + 1, len(runner.blocks))
    return records


def realised_sparsity(blocks) -> tuple[int, int]:
    """(zeros, weights) over every decoder Linear: the sparsity the budget is about."""
    zeros = total = 0
    for block in blocks:
        for _, m in prunable_linears(block):
            zeros += int((m.weight.data == 0).sum())
            total += m.weight.numel()
    return zeros, total
