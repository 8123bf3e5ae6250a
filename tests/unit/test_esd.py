import pytest
import torch

from absorbdeploy import esd


@pytest.mark.parametrize("alpha", [2.0, 3.0, 4.5])
def test_hill_estimator_recovers_a_power_law_exponent(alpha):
    """Eigenvalues drawn from a Pareto tail with density ~ x^-alpha (x >= 1); xmin_peak should find alpha within 10 %."""
    g = torch.Generator().manual_seed(0)
    u = torch.rand(2000, generator=g, dtype=torch.float64)
    tail = (1 - u) ** (-1 / (alpha - 1))  # inverse CDF of the Pareto law with exponent alpha
    bulk = 0.2 + 0.8 * torch.rand(400, generator=g, dtype=torch.float64)  # a bulk below the tail, as in real ESDs
    eigs = torch.cat([bulk, tail]).sort().values
    estimate = esd.hill_alpha_xmin_peak(eigs)
    assert estimate == pytest.approx(alpha, rel=0.10)


def test_trained_like_matrices_have_heavier_tails_than_noise():
    g = torch.Generator().manual_seed(1)
    noise = torch.randn(256, 256, generator=g)
    u, _, v = torch.linalg.svd(torch.randn(256, 256, generator=g))
    heavy = u @ torch.diag(torch.arange(1, 257, dtype=torch.float32) ** -0.6 * 30) @ v.T + 0.05 * noise
    assert esd.matrix_alpha(heavy) < esd.matrix_alpha(noise)
