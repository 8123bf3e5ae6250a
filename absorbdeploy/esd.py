"""AlphaPruning's heavy-tail metric (Lu et al. 2024; pruning §3.2): the power-law exponent of a weight matrix's ESD.

The empirical spectral density is the squared singular values of W (fp32, `svdvals`). The Hill estimator for a tail that
starts at x_min = lambda_i is alpha(i) = 1 + n / sum_{j>=i} ln(lambda_j / lambda_i) with n = N - i; its fit is the KS
distance D(i) = max_m |1 - (lambda_{i+m}/lambda_i)^(1-alpha) - m/n|. `xmin_peak` histograms log10(lambda) in 100 bins,
takes the left edge p of the fullest bin and tries every x_min up to 1.5 p, keeping the smallest D. Like the authors'
code, the window's lower bound is log10(0.95 p) compared against linear eigenvalues (pruning §0.6), so in practice the
window is "all eigenvalues up to 1.5 p"; reproducing the quirk keeps our alphas equal to the published ones.
"""


def eigenvalues(weight):
    """Squared singular values, ascending, fp32 (on the weight's device: a GPU makes the SVDs fast)."""
    import torch

    values = torch.linalg.svdvals(weight.detach().to(torch.float32)).square()
    return values.sort().values


def hill_alpha_xmin_peak(eigs, bins: int = 100) -> float:
    import torch

    eigs = eigs.to(torch.float64).clamp_min(torch.finfo(torch.float32).tiny)
    n_total = eigs.numel()
    logs = eigs.log()
    log10 = eigs.log10()
    low, high = log10.min(), log10.max()
    counts = torch.histc(log10, bins, min=low.item(), max=high.item())
    edges = torch.linspace(low.item(), high.item(), bins + 1, dtype=torch.float64)
    peak = 10 ** edges[int(counts.argmax())]
    lower, upper = torch.log10(0.95 * peak), 1.5 * peak  # the authors' units quirk, kept on purpose
    suffix = logs.flip(0).cumsum(0).flip(0)  # sum_{j>=i} ln lambda_j
    index = torch.arange(n_total - 1)
    # candidates in eigenvalue order; the scan stops at the first eigenvalue above the window (as the authors' loop)
    above = (eigs[:-1] > upper).nonzero()
    stop = int(above[0]) if len(above) else n_total - 1
    candidates = index[:stop][eigs[:stop] >= lower]
    if len(candidates) == 0:
        return 0.0
    n = (n_total - candidates).to(torch.float64)
    alphas = 1 + n / (suffix[candidates] - n * logs[candidates])
    # KS distance per candidate over its tail: rows = candidates, columns = tail positions m (masked beyond the tail)
    m = torch.arange(n_total, dtype=torch.float64)
    positions = candidates[:, None] + m[None, :].long()
    valid = positions < n_total
    tail = eigs[positions.clamp(max=n_total - 1)] / eigs[candidates][:, None]
    fit = (1 - tail ** (1 - alphas[:, None]) - m[None, :] / n[:, None]).abs().masked_fill(~valid, 0)
    distances = torch.where(alphas > 1, fit.max(dim=1).values, torch.ones_like(alphas))
    best = int(distances.argmin())
    return float(alphas[best]) if distances[best] < 1 else 0.0


def matrix_alpha(weight) -> float:
    return hill_alpha_xmin_peak(eigenvalues(weight).cpu())
