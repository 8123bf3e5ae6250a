"""Integrity of packed matrices and of a checkpoint's targets: every kind of damage the format can carry is refused with
one line naming the module, and a consistent matrix (any shape, sparsity, values dtype) passes."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from absorbdeploy.sparse import integrity
from absorbdeploy.sparse.codec import PARTS, PackedFormatError, compress_bitmask

NAME = "model.layers.0.mlp.up_proj"


def packed(rows=6, columns=21, density=0.4, dtype=torch.bfloat16, seed=0) -> dict:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, columns, generator=g) * (torch.rand(rows, columns, generator=g) < density)
    return compress_bitmask(w.to(dtype))


@settings(max_examples=40, deadline=None)
@given(rows=st.integers(1, 40), columns=st.integers(1, 70), density=st.floats(0, 1), seed=st.integers(0, 99),
       dtype=st.sampled_from([torch.bfloat16, torch.float16]))
def test_every_matrix_the_codec_writes_passes(rows, columns, density, seed, dtype):
    parts = packed(rows, columns, density, dtype, seed)
    integrity.check_packed(NAME, parts, str(dtype).removeprefix("torch."), rows, columns)
    integrity.check_layout(NAME, integrity.describe(parts), str(dtype).removeprefix("torch."), rows, columns)


def _flip_first_free_bit(parts):
    """Set a bit that is clear in row 0 (a row with more set bits than its values)."""
    bits = parts["bitmask"]
    for column in range(21):
        byte, bit = divmod(column, 8)
        if not bits[0, byte] >> bit & 1:
            bits[0, byte] |= 1 << bit
            return parts
    raise AssertionError("row 0 is full")


def _clear_first_set_bit(parts):
    bits = parts["bitmask"]
    for column in range(21):
        byte, bit = divmod(column, 8)
        if bits[0, byte] >> bit & 1:
            bits[0, byte] &= ~(1 << bit) & 0xFF
            return parts
    raise AssertionError("row 0 is empty")


def _shift_offsets(parts):
    """Row offsets shifted by one from row 2 on, still increasing."""
    parts["row_offsets"][2:] += 1
    return parts


def _stray_bit(parts):
    parts["bitmask"][3, -1] |= 0x80  # column 23 of a 21-column matrix
    return parts


DAMAGE = {
    "a row with one more bit than its values": (_flip_first_free_bit, "bits set, model.layers.0.mlp.up_proj.compressed holds"),
    "a row with one bit fewer": (_clear_first_set_bit, "bits set, model.layers.0.mlp.up_proj.compressed holds"),
    "row offsets shifted but increasing": (_shift_offsets, "up_proj.row_offsets: row 2 starts at"),
    "a bit past in_features": (_stray_bit, "up_proj.bitmask: row 3 has bits set past column 21"),
    "a dropped bitmask": (lambda p: {k: v for k, v in p.items() if k != "bitmask"}, "has no model.layers.0.mlp.up_proj.bitmask"),
    "values in fp32": (lambda p: {**p, "compressed": p["compressed"].float()}, "compressed: dtype float32, the format stores bfloat16"),
    "row offsets as int32": (lambda p: {**p, "row_offsets": p["row_offsets"].int()}, "row_offsets: dtype int32"),
    "a 2-D values tensor": (lambda p: {**p, "compressed": p["compressed"].reshape(1, -1)}, "compressed: 2-D tensor"),
    "a shape that disagrees with the Linear": (lambda p: {**p, "shape": torch.tensor([6, 22])}, "up_proj.shape: says [6, 22], the model's Linear is [6, 21]"),
    "a bitmask one byte short": (lambda p: {**p, "bitmask": p["bitmask"][:, :2].contiguous()}, "up_proj.bitmask: shape [6, 2], a [6, 21] matrix needs [6, 3]"),
    "one row offset missing": (lambda p: {**p, "row_offsets": p["row_offsets"][:-1]}, "up_proj.row_offsets: shape [5]"),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_each_damage_is_refused_with_one_line_naming_the_module(damage):
    harm, expected = DAMAGE[damage]
    with pytest.raises(PackedFormatError) as refused:
        integrity.check_packed(NAME, harm(packed()), "bfloat16", 6, 21)
    message = str(refused.value)
    assert expected in message and NAME in message and "\n" not in message


def test_the_header_check_sees_dtypes_and_shapes_without_reading_a_tensor():
    parts = packed()
    header = {f"{NAME}.{p}": {"dtype": {"int64": "I64", "uint8": "U8", "bfloat16": "BF16"}[str(t.dtype)[6:]],
                              "shape": list(t.shape), "data_offsets": [0, 0]} for p, t in parts.items()}
    integrity.check_layout(NAME, integrity.describe_header(header, NAME), "bfloat16", 6, 21)
    with pytest.raises(PackedFormatError, match="the format stores float16"):
        integrity.check_layout(NAME, integrity.describe_header(header, NAME), "float16", 6, 21)
    with pytest.raises(PackedFormatError, match=r"a \[7, 21\] matrix needs \[7, 3\]"):
        integrity.check_layout(NAME, integrity.describe_header(header, NAME), "bfloat16", 7, 21)


def test_targets_and_tensors_must_name_the_same_modules():
    names = [f"a.{p}" for p in PARTS] + [f"b.{p}" for p in PARTS] + ["c.weight"]
    integrity.check_targets(["a", "b"], names)
    with pytest.raises(PackedFormatError, match=r"^z: listed in quantization_config.targets, but the checkpoint has no z.shape"):
        integrity.check_targets(["a", "b", "z"], names)
    with pytest.raises(PackedFormatError, match=r"^b: the checkpoint holds packed tensors for it, but quantization_config.targets"):
        integrity.check_targets(["a"], names)
    with pytest.raises(PackedFormatError, match=r"^a: .* has no a.bitmask"):
        integrity.check_targets(["a", "b"], [n for n in names if n != "a.bitmask"])


def packed_int8(rows=6, columns=21, density=0.4, seed=0) -> dict:
    from absorbdeploy.sparse.codec import encode

    g = torch.Generator().manual_seed(seed)
    return encode(torch.randn(rows, columns, generator=g) * (torch.rand(rows, columns, generator=g) < density),
                  "sparse-bitmask", "int8")


def _scale(parts, row, value):
    parts["weight_scale"][row] = value
    return parts


INT8_DAMAGE = {
    "no scales": (lambda p: {k: v for k, v in p.items() if k != "weight_scale"}, "has no model.layers.0.mlp.up_proj.weight_scale"),
    "bf16 scales": (lambda p: {**p, "weight_scale": p["weight_scale"].bfloat16()}, "weight_scale: dtype bfloat16, the format stores float32"),
    "one scale short": (lambda p: {**p, "weight_scale": p["weight_scale"][:-1]}, "weight_scale: shape [5], a [6, 21] matrix needs [6]"),
    "a zero scale": (lambda p: _scale(p, 2, 0.0), "weight_scale: row 2 has scale 0.0"),
    "a NaN scale": (lambda p: _scale(p, 4, float("nan")), "weight_scale: row 4 has scale nan"),
    "an infinite scale": (lambda p: _scale(p, 1, float("inf")), "weight_scale: row 1 has scale inf"),
    "bf16 values": (lambda p: {**p, "compressed": p["compressed"].bfloat16()}, "compressed: dtype bfloat16, the format stores int8"),
}


@pytest.mark.parametrize("damage", list(INT8_DAMAGE))
def test_int8_scales_are_checked_like_every_other_part(damage):
    integrity.check_packed(NAME, packed_int8(), "int8", 6, 21)
    harm, expected = INT8_DAMAGE[damage]
    with pytest.raises(PackedFormatError) as refused:
        integrity.check_packed(NAME, harm(packed_int8()), "int8", 6, 21)
    assert expected in str(refused.value) and "\n" not in str(refused.value)


def test_scales_where_the_values_take_none_are_refused():
    with pytest.raises(PackedFormatError, match="up_proj.weight_scale: not a part of bfloat16 values"):
        integrity.check_packed(NAME, {**packed(), "weight_scale": torch.ones(6)}, "bfloat16", 6, 21)
    names = [f"a.{p}" for p in PARTS]
    with pytest.raises(PackedFormatError, match=r"^a: .* has no a.weight_scale"):
        integrity.check_targets(["a"], names, "int8")
