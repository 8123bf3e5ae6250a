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
    best_alpha, best_d = 0.0, 1.0
    for i in range(n_total - 1):
        xmin = eigs[i]
        if xmin < lower:
            continue
        if xmin > upper:
            break
        n = n_total - i
        alpha = 1 + n / (suffix[i] - n * logs[i])
        if alpha > 1:
            steps = torch.arange(n, dtype=torch.float64)
            d = (1 - (eigs[i:] / xmin) ** (1 - alpha) - steps / n).abs().max().item()
            if d < best_d:
                best_alpha, best_d = alpha.item(), d
    return best_alpha


def matrix_alpha(weight) -> float:
    return hill_alpha_xmin_peak(eigenvalues(weight).cpu())
