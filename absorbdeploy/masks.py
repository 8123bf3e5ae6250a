"""Pruning masks as pure functions over tensors (pruning §2.1, §2.2). True marks a weight to prune.

Scores: magnitude |W|; Wanda |W_rj| * ||x_j||. Selection is exact in count: `smallest_k_mask` picks exactly k entries of a
whole matrix (magnitude's one threshold per matrix; ties broken by position), `row_mask` spreads k over the rows as
floor(k/R) each plus one more for the (k mod R) rows whose next-smallest score is lowest (pruning §3.6), so Wanda's
per-row comparison group holds and the matrix count is exact; `nm_mask` prunes N of every M consecutive inputs of a row.
Selection uses kthvalue/topk only: no full sort, no loop over columns.
"""


def magnitude_scores(weight):
    return weight.abs().float()


def wanda_scores(weight, col_norm):
    return weight.abs().float() * col_norm.to(weight.device).float().unsqueeze(0)


def smallest_k_mask(scores, k: int):
    """Exactly k True entries at the k smallest scores of the whole tensor."""
    import torch

    flat = scores.reshape(-1)
    n = flat.numel()
    if k <= 0:
        return torch.zeros_like(scores, dtype=torch.bool)
    if k >= n:
        return torch.ones_like(scores, dtype=torch.bool)
    threshold = flat.kthvalue(k).values
    mask = flat < threshold
    missing = k - int(mask.sum())
    if missing > 0:
        ties = (flat == threshold).nonzero().squeeze(1)[:missing]
        mask[ties] = True
    return mask.view_as(scores)


def row_mask(scores, k: int):
    """Exactly k True entries, per output row: floor(k/R) in every row, one more in (k mod R) rows."""
    import torch

    rows, columns = scores.shape
    if not 0 <= k <= rows * columns:
        raise ValueError(f"cannot prune {k} of {rows * columns} weights")
    base, extra = divmod(k, rows)
    mask = torch.zeros_like(scores, dtype=torch.bool)
    take = min(base + (1 if extra else 0), columns)
    if take == 0:
        return mask
    values, indices = scores.topk(take, dim=1, largest=False, sorted=True)
    if base:
        mask.scatter_(1, indices[:, :base], True)
    if extra:
        chosen = values[:, base].topk(extra, largest=False).indices
        mask[chosen, indices[chosen, base]] = True
    return mask


def nm_mask(scores, n: int, m: int):
    """N True entries in every group of M consecutive inputs (columns) of each row."""
    import torch

    rows, columns = scores.shape
    if columns % m:
        raise ValueError(f"{n}:{m} groups need the input dimension divisible by {m}, got {columns} (blocks.check_nm)")
    groups = scores.reshape(rows, columns // m, m)
    mask = torch.zeros_like(groups, dtype=torch.bool)
    mask.scatter_(2, groups.topk(n, dim=2, largest=False).indices, True)
    return mask.view(rows, columns)


def is_nm(weight, n: int, m: int) -> bool:
    """Every group of M consecutive inputs holds at least N zeros."""
    rows, columns = weight.shape
    if columns % m:
        return False
    zeros = (weight.reshape(rows, columns // m, m) == 0).sum(-1)
    return bool((zeros >= n).all())
