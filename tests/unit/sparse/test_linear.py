"""BitmaskLinear against nn.Linear on the same weights; dtype casts leave the packed values alone; densify."""

import torch

from absorbdeploy.sparse.codec import compress_bitmask
from absorbdeploy.sparse.linear import BitmaskLinear, densify, resident_weight_bytes


def _sparse_weight(rows=12, columns=20, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(rows, columns, generator=g) * (torch.rand(rows, columns, generator=g) > 0.6)).to(torch.bfloat16)


def test_forward_equals_a_dense_linear_with_the_same_weight():
    w, bias = _sparse_weight(), torch.randn(12)
    module = BitmaskLinear.from_parts(compress_bitmask(w), bias)
    x = torch.randn(3, 5, 20)
    expected = torch.nn.functional.linear(x, w.float(), bias)
    assert torch.allclose(module(x), expected, rtol=1e-5, atol=1e-5)
    assert module(x.to(torch.bfloat16)).dtype == torch.bfloat16


def test_dtype_casts_move_but_never_convert_the_packed_values():
    module = BitmaskLinear.from_parts(compress_bitmask(_sparse_weight()), torch.randn(12))
    module.to(torch.float16)
    assert module.compressed.dtype == torch.bfloat16 and module.bias.dtype == torch.float16
    module.float()
    assert module.compressed.dtype == torch.bfloat16 and module.bias.dtype == torch.float32


def test_densify_gives_back_the_exact_weight():
    w = _sparse_weight()
    model = torch.nn.Sequential(BitmaskLinear.from_parts(compress_bitmask(w)))
    assert resident_weight_bytes(model) < w.numel() * 2
    assert densify(model) == 1 and torch.equal(model[0].weight, w)


def test_int8_values_forward_casts_and_densify_use_the_dequantized_weight():
    from absorbdeploy.sparse.codec import encode

    w, bias = _sparse_weight().float(), torch.randn(12)
    parts = encode(w, "sparse-bitmask", "int8")
    module = BitmaskLinear.from_parts(parts, bias)
    dequantized = module.dense_weight()
    assert module.compressed.dtype == torch.int8 and module.weight_scale.dtype == torch.float32
    assert torch.equal(dequantized != 0, w != 0) and float((dequantized - w).abs().max()) <= float(parts["weight_scale"].max())
    x = torch.randn(3, 5, 20)
    assert torch.allclose(module(x), torch.nn.functional.linear(x, dequantized, bias), rtol=1e-5, atol=1e-5)
    module.to(torch.bfloat16)  # the scales are stored bytes too: never rounded to the model's dtype
    assert module.compressed.dtype == torch.int8 and module.weight_scale.dtype == torch.float32
    assert torch.equal(module.weight_scale, parts["weight_scale"]) and module.bias.dtype == torch.bfloat16
    assert module.packed_bytes() == sum(t.numel() * t.element_size() for t in parts.values())
    model = torch.nn.Sequential(module.float())
    assert densify(model) == 1 and torch.equal(model[0].weight, dequantized)
