"""The bitmask codec (pure): bytes checked by hand and against numpy.packbits, 2:4 refusal, and the round trip."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from absorbdeploy.sparse.codec import compress_24, compress_bitmask, decode, decompress_24, decompress_bitmask, encode
from absorbdeploy.sparse import codec
from absorbdeploy.sparse.codec import PackedFormatError


def test_bitmask_bytes_by_hand():
    w = torch.tensor([[0.0, 1.5, 0.0, 0.0, 2.0, 0.0, 0.0, 0.0, 3.0, 0.0],
                      [4.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 5.0, 0.0, 0.0]], dtype=torch.bfloat16)
    parts = compress_bitmask(w)
    # little-endian bits along each row: row 0 sets bits 1, 4 | 8 -> bytes 0b00010010 = 18, 0b00000001 = 1
    assert parts["bitmask"].tolist() == [[18, 1], [129, 0]]
    assert parts["compressed"].tolist() == [1.5, 2.0, 3.0, 4.0, 5.0] and parts["compressed"].dtype == torch.bfloat16
    assert parts["row_offsets"].tolist() == [0, 3] and parts["shape"].tolist() == [2, 10]
    assert torch.equal(decompress_bitmask(parts), w)


def test_bitmask_matches_numpy_packbits_on_odd_shapes():
    g = torch.Generator().manual_seed(3)
    for shape in [(1, 1), (3, 7), (5, 9), (17, 33)]:
        w = torch.randn(*shape, generator=g) * (torch.rand(*shape, generator=g) > 0.6)
        parts = compress_bitmask(w)
        expected = np.packbits((w != 0).numpy(), axis=-1, bitorder="little")
        assert np.array_equal(parts["bitmask"].numpy(), expected) and torch.equal(decompress_bitmask(parts), w)


def test_two_four_refuses_a_tensor_that_is_not_two_four():
    ok = torch.tensor([[0.0, 1.0, 0.0, 2.0, 3.0, 0.0, 0.0, 0.0]])
    parts = compress_24(ok)
    assert parts["shape"].tolist() == [[1], [8]] and parts["compressed"].shape == (1, 4)
    assert torch.equal(decompress_24(parts), ok)
    with pytest.raises(PackedFormatError, match="not 2:4"):
        compress_24(torch.tensor([[1.0, 1.0, 1.0, 0.0]]))


@settings(max_examples=60, deadline=None)
@given(rows=st.integers(1, 40), columns=st.integers(1, 70), density=st.floats(0, 1), seed=st.integers(0, 10**6))
def test_round_trip_is_exact_and_row_offsets_index_each_row(rows, columns, density, seed):
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(rows, columns, generator=g) * (torch.rand(rows, columns, generator=g) < density)).to(torch.bfloat16)
    parts = encode(w, "sparse-bitmask")
    assert torch.equal(decode(parts, "sparse-bitmask"), w)
    counts = (w != 0).sum(1)
    assert parts["row_offsets"].tolist() == (torch.cumsum(counts, 0) - counts).tolist()
    assert parts["bitmask"].shape == (rows, (columns + 7) // 8)


def test_a_bitmask_that_disagrees_with_its_values_is_refused():
    parts = compress_bitmask(torch.tensor([[1.0, 0.0, 2.0]]))
    parts["compressed"] = parts["compressed"][:1]
    with pytest.raises(PackedFormatError, match="2 bits set, 1 values"):
        decompress_bitmask(parts)


@settings(max_examples=40, deadline=None)
@given(rows=st.integers(1, 30), columns=st.integers(1, 9).map(lambda c: 8 * c), density=st.floats(0, 1),
       seed=st.integers(0, 10**6), data=st.data())
def test_shards_equal_the_dense_slices(rows, columns, density, seed, data):
    from absorbdeploy.sparse.codec import concat_rows, slice_columns, slice_rows

    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(rows, columns, generator=g) * (torch.rand(rows, columns, generator=g) < density)).to(torch.bfloat16)
    parts = compress_bitmask(w)
    r0 = data.draw(st.integers(0, rows))
    r1 = data.draw(st.integers(r0, rows))
    assert torch.equal(decompress_bitmask(slice_rows(parts, r0, r1)), w[r0:r1])
    c0 = 8 * data.draw(st.integers(0, columns // 8))
    c1 = 8 * data.draw(st.integers(c0 // 8, columns // 8))
    shard = slice_columns(parts, c0, c1)
    assert torch.equal(decompress_bitmask(shard), w[:, c0:c1])
    counts = (w[:, c0:c1] != 0).sum(1)
    assert shard["row_offsets"].tolist() == (torch.cumsum(counts, 0) - counts).tolist()
    fused = concat_rows([slice_rows(parts, 0, r0), slice_rows(parts, r0, rows)])
    assert torch.equal(decompress_bitmask(fused), w) and torch.equal(fused["row_offsets"], parts["row_offsets"])


def test_a_row_parallel_cut_must_fall_on_a_bitmask_byte():
    from absorbdeploy.sparse.codec import slice_columns

    with pytest.raises(ValueError, match="byte of the bitmask"):
        slice_columns(compress_bitmask(torch.ones(2, 16)), 4, 16)


@pytest.mark.parametrize("width", [5, 6, 12, 16, 24])  # bytes per row: uint8, 16-, 32- and 64-bit words
def test_row_popcounts_count_every_set_bit(width):
    bits = torch.randint(0, 256, (9, width), dtype=torch.uint8, generator=torch.Generator().manual_seed(width))
    expected = torch.tensor([sum(bin(int(b)).count("1") for b in row) for row in bits])
    assert torch.equal(codec.row_popcounts(bits), expected)
    assert torch.equal(codec.row_popcounts(bits[:, 1:]), expected - torch.tensor([bin(int(b)).count("1") for b in bits[:, 0]]))
    assert torch.equal(codec.row_popcounts(bits[:, :0]), torch.zeros(9, dtype=torch.int64))


@pytest.mark.parametrize("targets", ["model.a", [1, 2], ["ok", ""], {"a": 1}])
def test_targets_must_be_a_list_of_names(targets):
    with pytest.raises(codec.PackedFormatError, match="targets must be a list of module names"):
        codec.FormatConfig.from_dict({"targets": targets})


@pytest.mark.parametrize("field", [{"values_dtype": "load"}, {"values_dtype": "float32"}, {"version": 3},
                                   {"format": "sparse-24-bitmask"}])
def test_unknown_config_values_are_refused(field):
    with pytest.raises(codec.PackedFormatError, match="unsupported format"):
        codec.FormatConfig.from_dict({"targets": ["a"], **field})


def test_version_2_names_its_weights_through_the_index_and_version_1_does_not():
    assert codec.FormatConfig().version == 2
    assert codec.names_weights_index(codec.FormatConfig(("a",)).to_dict())
    assert not codec.names_weights_index({**codec.FormatConfig(("a",)).to_dict(), "version": 1})
    assert not codec.names_weights_index({"quant_method": "compressed-tensors", "version": 2})
    assert not codec.names_weights_index(None)


@settings(max_examples=40, deadline=None)
@given(rows=st.integers(1, 30), columns=st.integers(1, 90), density=st.floats(0, 1), seed=st.integers(0, 10**6),
       spread=st.floats(-20, 20))
def test_int8_values_keep_the_mask_and_err_by_at_most_half_a_step(rows, columns, density, seed, spread):
    """Symmetric per-channel int8 from the kept weights: q in [-127, 127], each row's largest |w| maps to 127, a kept
    weight never becomes zero (the bitmask is the pruning mask), and every weight errs by at most half its row's step
    (a step where rounding to zero was refused)."""
    from absorbdeploy.sparse.codec import SCALE_PART, encode, quantize_values

    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, columns, generator=g) * 10.0 ** spread * (torch.rand(rows, columns, generator=g) < density)
    q, scales = quantize_values(w)
    assert q.dtype == torch.int8 and scales.dtype == torch.float32 and bool((q.abs() <= 127).all())
    assert torch.equal(q != 0, w != 0)
    kept = (w != 0).any(1)
    assert torch.equal(q.abs().amax(1)[kept], torch.full((int(kept.sum()),), 127, dtype=torch.int8))
    assert bool((scales[~kept] == 1).all())
    error = (q.float() * scales.unsqueeze(1) - w).abs()
    allowed = torch.where(w.abs() < scales.unsqueeze(1) / 2, 1.0, 0.5 * (1 + 1e-5)) * scales.unsqueeze(1)
    assert bool((error <= allowed).all())
    parts = encode(w, "sparse-bitmask", "int8")
    assert torch.equal(parts["compressed"], q[q != 0]) and torch.equal(parts[SCALE_PART], scales)
    assert torch.equal(decompress_bitmask(parts), q.float() * scales.unsqueeze(1))


def test_int8_scales_follow_row_and_column_shards():
    from absorbdeploy.sparse.codec import SCALE_PART, concat_rows, encode, slice_columns, slice_rows

    w = torch.randn(12, 32) * (torch.rand(12, 32) < 0.5)
    parts = encode(w, "sparse-bitmask", "int8")
    dense = decompress_bitmask(parts)
    assert torch.equal(decompress_bitmask(slice_rows(parts, 3, 9)), dense[3:9])
    assert torch.equal(decompress_bitmask(slice_columns(parts, 8, 24)), dense[:, 8:24])
    fused = concat_rows([slice_rows(parts, 0, 5), slice_rows(parts, 5, 12)])
    assert torch.equal(fused[SCALE_PART], parts[SCALE_PART]) and torch.equal(decompress_bitmask(fused), dense)
    with pytest.raises(ValueError, match="all have scales"):
        concat_rows([slice_rows(parts, 0, 5), compress_bitmask(w[5:].bfloat16())])
    with pytest.raises(PackedFormatError, match="sparse-bitmask layout only"):
        encode(torch.zeros(4, 8), "sparse-24-bitmask", "int8")


def test_int8_config_declares_its_scales_and_a_mismatch_is_refused():
    int8 = codec.FormatConfig(("m",), values_dtype="int8")
    assert int8.to_dict()["scale_layout"] == "per-channel" and int8.parts[-1] == "weight_scale"
    assert codec.FormatConfig.from_dict(int8.to_dict()) == int8
    assert "scale_layout" not in codec.FormatConfig(("m",)).to_dict()
    for bad in ({**int8.to_dict(), "scale_layout": "per-group-128"}, {**int8.to_dict(), "scale_layout": None},
                {**codec.FormatConfig(("m",)).to_dict(), "scale_layout": "per-channel"}):
        with pytest.raises(PackedFormatError, match="scale_layout"):
            codec.FormatConfig.from_dict(bad)


def test_w8a8_config_declares_its_activations_and_a_mismatch_is_refused():
    w8a8 = codec.FormatConfig(("m",), values_dtype="int8", input_activations=codec.INT8_PER_TOKEN)
    assert w8a8.to_dict()["input_activations"] == "int8-per-token" and w8a8.quantize_x
    assert codec.FormatConfig.from_dict(w8a8.to_dict()) == w8a8
    w8a16 = codec.FormatConfig(("m",), values_dtype="int8")
    assert "input_activations" not in w8a16.to_dict() and not codec.FormatConfig.from_dict(w8a16.to_dict()).quantize_x
    for bad in ({**w8a8.to_dict(), "input_activations": "int8-per-tensor"},
                {**codec.FormatConfig(("m",)).to_dict(), "input_activations": "int8-per-token"}):
        with pytest.raises(PackedFormatError, match="input_activations"):
            codec.FormatConfig.from_dict(bad)
