"""absorbdeploy::bitmask_linear with quantize_x (W8A8): x quantized per token, int8 values, integer sums. Every ISA path
and kernel path against the exact product of the same x_q and q (fp64 sums, which are exact), times both scales:
odd shapes, all-zero rows and tokens, biases, extreme scales, 16-bit x; the integer path bit for bit; the refusals."""

import pytest
import torch

from absorbdeploy.sparse import kernels
from absorbdeploy.sparse.codec import SCALE_PART, compress_bitmask, encode
from absorbdeploy.sparse.kernels.ops import quantize_tokens
from tests.unit.sparse.kernels.test_ops import kernel_path, path  # noqa: F401  (fixtures)


def quantized_weight(out, inn, sparsity, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, inn, generator=g)
    w[torch.rand(out, inn, generator=g) < sparsity] = 0
    if out > 2:
        w[1] = 0  # an all-zero row
    return encode(w, "sparse-bitmask", "int8")


def run(path, x, parts, in_features, bias=None):
    fn = kernels.bitmask_linear_reference if path == "reference" else kernels.bitmask_linear
    return fn(x, parts["compressed"], parts["bitmask"], parts["row_offsets"], in_features, bias, parts[SCALE_PART],
              True)


def exact(x, parts, in_features, bias=None):
    """(y, magnitude) in fp64: x_q . q summed exactly, times x's and W's scales, plus the bias; magnitude is the same
    with every term's absolute value (the size an fp32 summation errs relative to)."""
    from absorbdeploy.sparse.codec import unpack_bits

    q = torch.zeros(parts["bitmask"].shape[0], in_features, dtype=torch.float64)
    q[unpack_bits(parts["bitmask"], in_features)] = parts["compressed"].double()
    x_q, x_scales = quantize_tokens(x.reshape(-1, in_features))
    scales = x_scales.double() * parts[SCALE_PART].double()
    y, magnitude = (x_q.double() @ q.T) * scales, (x_q.double().abs() @ q.abs().T) * scales
    if bias is not None:
        y, magnitude = y + bias.double(), magnitude + bias.double().abs()
    return y, magnitude


@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("out, inn, sparsity", [(37, 200, 0.5), (64, 1000, 0.7), (5, 64, 0.0), (130, 577, 0.9)])
def test_w8a8_matches_the_exact_integer_product(path, kernel_path, x_dtype, out, inn, sparsity):  # noqa: F811
    parts = quantized_weight(out, inn, sparsity, seed=out)
    g = torch.Generator().manual_seed(inn)
    bias = torch.randn(out, generator=g)
    for batch in (1, 3, 9, 40):
        x = (torch.randn(batch, inn, generator=g) * 4).to(x_dtype)
        if batch > 2:
            x[2] = 0  # an all-zero token: scale 1, x_q 0, y = bias
        y = run(path, x, parts, inn, bias)
        ref, magnitude = exact(x, parts, inn, bias)
        assert y.dtype == x_dtype and y.shape == (batch, out)
        bound = 1e-5 * magnitude + (ref.abs() * torch.finfo(x_dtype).eps / 2 if x_dtype != torch.float32 else 0)
        error = (y.double() - ref).abs()
        assert bool((error <= bound + 1e-30).all()), f"max error {float(error.max()):.3g}"
        if batch > 2:
            assert torch.equal(y[2].float(), bias.to(x_dtype).float())


def test_the_integer_path_sums_exactly(monkeypatch):
    """Where the CPU has AVX-512 VNNI, the fused path's int32 sums are exact: y equals the reference bit for bit (both
    round the exact sum to fp32 once, then multiply by the token's scale and the row's), including sums past 2^24."""
    kernels.ensure_loaded()
    if "avx512" not in kernels.available_paths() or not _has_vnni():
        pytest.skip("no AVX-512 VNNI here: the fused W8A8 path runs the W8A16 kernel on the dequantised x")
    monkeypatch.setenv(kernels.ISA_VARIABLE, "avx512")
    monkeypatch.setenv(kernels.PATH_VARIABLE, "fused")
    q = torch.full((8, 4000), 127, dtype=torch.int8)  # |sum| = 127 * 127 * 4000 > 2^24
    q[3, ::2] = -127
    parts = {**compress_bitmask(q), SCALE_PART: torch.linspace(0.5, 2.0, 8)}
    x = torch.ones(3, 4000)
    x[1] = -torch.linspace(0, 3, 4000)
    assert torch.equal(run("avx512", x, parts, 4000), run("reference", x, parts, 4000))


def _has_vnni() -> bool:
    try:
        return "avx512_vnni" in next(l for l in open("/proc/cpuinfo") if l.startswith("flags"))
    except (OSError, StopIteration):
        return False


@pytest.mark.parametrize("scale", [1e-25, 1e25])  # results stay inside fp32's normal range
def test_extreme_weight_and_activation_scales(path, kernel_path, scale):  # noqa: F811
    g = torch.Generator().manual_seed(3)
    q = torch.randint(-127, 128, (19, 203), generator=g, dtype=torch.int8)
    q[torch.rand(19, 203, generator=g) < 0.6] = 0
    parts = {**compress_bitmask(q), SCALE_PART: torch.full((19,), scale) * torch.logspace(-2, 2, 19)}
    x = torch.randn(5, 203, generator=g) * torch.logspace(-3, 3, 5).unsqueeze(1)
    y = run(path, x, parts, 203)
    ref, magnitude = exact(x, parts, 203)
    assert bool(((y.double() - ref).abs() <= 1e-5 * magnitude).all())


def test_quantize_x_needs_int8_values_and_bounded_sums():
    kernels.ensure_loaded()
    w = torch.randn(6, 40)
    bf16 = compress_bitmask(w.bfloat16())
    with pytest.raises(RuntimeError, match="quantize_x .W8A8. needs int8 values"):
        kernels.bitmask_linear(torch.randn(2, 40), bf16["compressed"], bf16["bitmask"], bf16["row_offsets"], 40,
                               None, None, True)
    if kernels.ensure_loaded() == "extension":
        wide = encode(torch.randn(2, 70000), "sparse-bitmask", "int8")
        with pytest.raises(RuntimeError, match="exact up to 66000 input features"):
            run("compiled", torch.randn(1, 70000), wide, 70000)


def test_quantize_tokens_is_symmetric_per_token_with_round_half_to_even():
    x = torch.tensor([[127.0, 0.5, -1.5, 2.5], [0.0, 0.0, 0.0, 0.0], [-254.0, 1.0, 3.0, -0.99]])
    x_q, scales = quantize_tokens(x)
    assert scales.shape == (3, 1) and scales.dtype == torch.float32 and x_q.dtype == torch.int8
    assert scales[:, 0].tolist() == [1.0, 1.0, 2.0]
    assert x_q.tolist() == [[127, 0, -2, 2], [0, 0, 0, 0], [-127, 0, 2, 0]]
