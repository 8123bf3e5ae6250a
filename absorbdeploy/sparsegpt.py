"""SparseGPT (Frantar & Alistarh 2023; pruning §2.3): prune one weight matrix with optimal-brain-surgeon updates.

H = sum_t x_t x_t^T (fp32). Dead inputs (H_jj = 0) get H_jj = 1, the diagonal is damped by `dampening * mean(diag H)`,
and U is the upper Cholesky factor of H^-1. Columns are processed in blocks of 128: the mask of a block is chosen from
the saliency w^2 / U_jj^2 of the already-updated weights, each pruned column's error is spread over the columns to its
right, and the block's accumulated error updates the rest lazily. One factor serves every matrix that shares the input
(q/k/v, gate/up). A Cholesky failure is retried once with 10x damping and then raised; there is no identity fallback.
We keep the exact per-matrix count `k` (split over column blocks by largest remainder) so the global budget is exact.
"""

from absorbdeploy.errors import UserError


class HessianNotPositiveDefinite(UserError):
    pass


def inverse_factor(hessian, dampening: float, retries: int = 1):
    """U with H^-1 = U^T U (upper Cholesky of the damped inverse). Returns (U, dampening actually used)."""
    import torch

    h = hessian.to(torch.float64 if hessian.device.type == "cpu" else torch.float32).clone()
    diag = torch.diagonal(h)
    diag[diag == 0] = 1.0
    base = diag.mean().item()
    damp = dampening
    for _ in range(retries + 1):
        damped = h + damp * base * torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
        factor, info = torch.linalg.cholesky_ex(damped)
        if info.item() == 0:
            inverse = torch.cholesky_inverse(factor)
            upper, info = torch.linalg.cholesky_ex(inverse, upper=True)
            if info.item() == 0:
                return upper.to(torch.float32), damp
        damp *= 10.0
    raise HessianNotPositiveDefinite(
        f"SparseGPT: the calibration Hessian is not positive definite even with dampening {damp / 10:g}; "
        "use more calibration samples (calibration.nsamples) or raise prune.sparsegpt.dampening"
    )


def _block_counts(k: int, columns: int, blocksize: int) -> list[int]:
    widths = [min(blocksize, columns - s) for s in range(0, columns, blocksize)]
    exact = [k * w / columns for w in widths]
    counts = [int(e) for e in exact]
    order = sorted(range(len(widths)), key=lambda i: exact[i] - counts[i], reverse=True)
    for i in order[: k - sum(counts)]:
        counts[i] += 1
    return counts


def prune(weight, upper, k: int | None = None, nm: tuple[int, int] | None = None, blocksize: int = 128, mask=None):
    """Returns the pruned and updated weight (fp32, same shape): exactly `k` zeros, or N of every M along the input,
    or, given `mask` (bool [out, in], True = prune), exactly those zeros with the same OBS update of the kept weights."""
    import torch

    from absorbdeploy.masks import smallest_k_mask

    w = weight.detach().to(torch.float32).clone()
    rows, columns = w.shape
    if nm is not None and blocksize % nm[1]:
        blocksize -= blocksize % nm[1]
    counts = _block_counts(k, columns, blocksize) if nm is None and mask is None else None
    for b, i1 in enumerate(range(0, columns, blocksize)):
        i2 = min(i1 + blocksize, columns)
        block = w[:, i1:i2].clone()
        u = upper[i1:i2, i1:i2]
        u_diag = torch.diagonal(u)
        errors = torch.zeros_like(block)
        if mask is not None:
            pruned = mask[:, i1:i2]
        elif nm is None:
            pruned = smallest_k_mask(block.square() / u_diag.square(), counts[b])
        else:
            pruned = torch.zeros_like(block, dtype=torch.bool)
        for i in range(i2 - i1):
            if mask is None and nm is not None and i % nm[1] == 0:
                saliency = block[:, i : i + nm[1]].square() / u_diag[i : i + nm[1]].square()
                pruned[:, i : i + nm[1]].scatter_(1, saliency.topk(nm[0], dim=1, largest=False).indices, True)
            column = block[:, i]
            kept = torch.where(pruned[:, i], torch.zeros_like(column), column)
            error = (column - kept) / u[i, i]
            block[:, i:] -= error.unsqueeze(1) * u[i, i:].unsqueeze(0)
            block[:, i] = kept
            errors[:, i] = error
        w[:, i1:i2] = block
        if i2 < columns:
            w[:, i2:] -= errors @ upper[i1:i2, i2:]
    return w
