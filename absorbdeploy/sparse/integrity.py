"""Integrity of a served-sparse `bitmask/` checkpoint, checked before any packed byte is used (the way safetensors
validates its header and offsets before reading a tensor). Pure functions over tensors, names and safetensors header
entries; every door runs them: transformers' quantizer (sparse/hf.py), the vLLM plugin (sparse/vllm.py), and
`absorbdeploy serve` / validation through `check_directory` (sparse/directory.py).

For one packed matrix W [rows, columns] in the sparse-bitmask layout (codec.py) the rules are:
- every part present (codec.parts_for the values dtype), with its dtype (codec.PART_DTYPES; `compressed` in the
  config's values dtype) and rank: shape int64 [2] = (rows, columns), compressed [nnz], bitmask uint8 [rows,
  ceil(columns / 8)], row_offsets int64 [rows], and for int8 values weight_scale float32 [rows], finite and > 0;
- no bit set past `columns` in the last byte of a row;
- row_offsets = the exclusive cumulative sum of the rows' popcounts (so it starts at 0, never decreases, each step is
  that row's popcount), and the total popcount = nnz;
and for the checkpoint: every target of the quantization_config has all its parts, and every packed tensor belongs to
a target. Each failure raises codec.PackedFormatError with one line naming the module and the mismatch.
"""

import math

from absorbdeploy.sparse.codec import (
    ALL_PARTS, SCALE_PART, PackedFormatError, part_dtype, parts_for, row_popcounts,
)

# safetensors header dtype names -> torch dtype names (the parts' dtypes in codec.PART_DTYPES are torch names).
HEADER_DTYPES = {"I64": "int64", "U8": "uint8", "BF16": "bfloat16", "F16": "float16", "F32": "float32",
                 "I32": "int32", "I8": "int8", "F64": "float64", "BOOL": "bool", "I16": "int16"}
PART_RANKS = {"shape": 1, "compressed": 1, "bitmask": 2, "row_offsets": 1, SCALE_PART: 1}


def expected_shapes(rows: int, columns: int, nnz: int) -> dict[str, tuple[int, ...]]:
    """The shape of each part of a [rows, columns] matrix with nnz non-zeros."""
    return {"shape": (2,), "compressed": (nnz,), "bitmask": (rows, math.ceil(columns / 8)), "row_offsets": (rows,),
            SCALE_PART: (rows,)}


def _check_parts(name: str, described: dict, values_dtype: str) -> None:
    expected = parts_for(values_dtype)
    missing = [part for part in expected if part not in described]
    if missing:
        raise PackedFormatError(f"{name}: the checkpoint has no {', '.join(f'{name}.{p}' for p in missing)}")
    stray = [part for part in described if part not in expected]
    if stray:
        raise PackedFormatError(f"{name}.{stray[0]}: not a part of {values_dtype} values")
    for part in expected:
        dtype, shape = described[part]
        want = part_dtype(part, values_dtype)
        if dtype != want:
            raise PackedFormatError(f"{name}.{part}: dtype {dtype}, the format stores {want}")
        if len(shape) != PART_RANKS[part]:
            raise PackedFormatError(f"{name}.{part}: {len(shape)}-D tensor of shape {list(shape)}, expected "
                                    f"{PART_RANKS[part]}-D")


def _check_sizes(name: str, described: dict, rows: int, columns: int) -> None:
    for part, want in expected_shapes(rows, columns, described["compressed"][1][0]).items():
        if part in described and tuple(described[part][1]) != want:
            raise PackedFormatError(f"{name}.{part}: shape {list(described[part][1])}, a [{rows}, {columns}] matrix "
                                    f"needs {list(want)}")


def check_layout(name: str, described: dict, values_dtype: str, rows: int, columns: int) -> None:
    """Parts' presence, dtypes and shapes for the [rows, columns] matrix the model expects, from
    `{part: (torch dtype name, shape tuple)}` (`describe_header` of a safetensors header, or `describe` of tensors).
    Raises PackedFormatError."""
    _check_parts(name, described, values_dtype)
    _check_sizes(name, described, rows, columns)


def describe(parts: dict) -> dict:
    """{part: (torch dtype name, shape)} of tensors, as check_layout reads it."""
    return {part: (str(t.dtype).removeprefix("torch."), tuple(t.shape)) for part, t in parts.items()}


def describe_header(header: dict, module: str) -> dict:
    """{part: (torch dtype name, shape)} of `module`'s parts in a safetensors header ({key: {dtype, shape, ...}})."""
    found = {}
    for part in ALL_PARTS:
        info = header.get(f"{module}.{part}")
        if info is not None:
            found[part] = (HEADER_DTYPES.get(info["dtype"], info["dtype"]), tuple(info["shape"]))
    return found


def check_contents(name: str, parts: dict) -> None:
    """The bits and offsets of one matrix whose layout check_layout accepted: no stray bits past `columns`, row
    offsets equal to the exclusive cumulative popcount, total popcount = number of values. Raises PackedFormatError."""
    import torch

    rows, columns = (int(v) for v in parts["shape"].reshape(-1))
    bitmask, offsets, nnz = parts["bitmask"], parts["row_offsets"], parts["compressed"].numel()
    if columns % 8 and rows:
        stray = bitmask[:, -1].cpu() >> (columns % 8)
        if bool(stray.any()):
            row = int(stray.nonzero()[0, 0])
            raise PackedFormatError(f"{name}.bitmask: row {row} has bits set past column {columns}")
    counts = row_popcounts(bitmask)
    if int(counts.sum()) != nnz:
        raise PackedFormatError(f"{name}: the bitmask has {int(counts.sum())} bits set, {name}.compressed holds "
                                f"{nnz} values")
    expected = torch.cumsum(counts, 0) - counts
    wrong = (offsets.cpu() != expected).nonzero()
    if wrong.numel():
        row = int(wrong[0, 0])
        raise PackedFormatError(f"{name}.row_offsets: row {row} starts at {int(offsets[row])}, its bitmask's "
                                f"preceding rows hold {int(expected[row])} values")
    if SCALE_PART in parts:
        scales = parts[SCALE_PART].cpu()
        bad = (~(torch.isfinite(scales) & (scales > 0))).nonzero()
        if bad.numel():
            row = int(bad[0, 0])
            raise PackedFormatError(f"{name}.{SCALE_PART}: row {row} has scale {float(scales[row])}, scales must be "
                                    "finite and > 0")


def check_packed(name: str, parts: dict, values_dtype: str, rows: int | None = None, columns: int | None = None) -> None:
    """One packed matrix {part: tensor} proven consistent before its bytes are used: parts, dtypes and ranks, its
    `shape` equal to (rows, columns) where the caller knows them (None: take it from `shape`, as for one checkpoint
    matrix of a fused vLLM layer, whose stacked size the caller checks), sizes, then check_contents.
    Raises PackedFormatError."""
    described = describe(parts)
    _check_parts(name, described, values_dtype)
    declared = tuple(int(v) for v in parts["shape"].reshape(-1))
    wanted = (declared[0] if rows is None else rows, declared[1] if columns is None else columns)
    if declared != wanted:
        raise PackedFormatError(f"{name}.shape: says {list(declared)}, the model's Linear is {list(wanted)}")
    _check_sizes(name, described, *declared)
    check_contents(name, parts)


def packed_modules(names) -> dict[str, set[str]]:
    """{module: parts present} for every tensor name ending in one of ALL_PARTS."""
    found: dict[str, set[str]] = {}
    for key in names:
        module, _, part = key.rpartition(".")
        if part in ALL_PARTS and module:
            found.setdefault(module, set()).add(part)
    return found


def check_targets(targets, names, values_dtype: str = "bfloat16") -> None:
    """Every target has all its parts (codec.parts_for `values_dtype`) among `names` (the checkpoint's tensor names)
    and every packed tensor is named by a target. Raises PackedFormatError naming the first module that is not so."""
    packed, targets = packed_modules(names), set(targets)
    for module in sorted(targets):
        missing = [p for p in parts_for(values_dtype) if p not in packed.get(module, set())]
        if missing:
            raise PackedFormatError(f"{module}: listed in quantization_config.targets, but the checkpoint has no "
                                    f"{', '.join(f'{module}.{p}' for p in missing)}")
    strays = sorted(set(packed) - targets)
    if strays:
        raise PackedFormatError(f"{strays[0]}: the checkpoint holds packed tensors for it, but quantization_config."
                                f"targets does not list it ({len(strays)} such module(s))")
