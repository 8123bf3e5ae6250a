"""The bitmask codec: a pruned weight matrix as its non-zeros plus one bit per weight (pure functions over tensors).

Layout of compressed-tensors <= 0.14 (export §2.2), also what our served-sparse format and the CPU kernel read:
  sparse-bitmask     shape int64 [2] | compressed [nnz] (row-major non-zeros, the weight's dtype)
                     | bitmask uint8 [out, ceil(in/8)] | row_offsets int64 [out] (index of each row's first non-zero)
  sparse-24-bitmask  shape int64 [2, 1] | compressed [out, in/2] | bitmask uint8 [out, in/8]
Bits are packed little-endian along the input dimension (numpy.packbits(bitorder="little")): bit j of row r is
W[r, j] != 0. 2:4 keeps the two largest |w| of every group of 4 whatever the tensor holds, so `compress_24` refuses a
tensor that is not 2:4 rather than silently re-pruning it.
"""

from absorbdeploy.errors import UserError

PARTS = ("shape", "compressed", "bitmask", "row_offsets")
LAYOUTS = ("sparse-bitmask", "sparse-24-bitmask")


def compress_bitmask(w) -> dict:
    """W [out, in] (any dtype) -> {shape, compressed [nnz] in W's dtype, bitmask uint8, row_offsets int64}."""
    import numpy as np
    import torch

    mask = w != 0
    count = mask.sum(dim=1)
    bits = np.packbits(mask.cpu().numpy(), axis=-1, bitorder="little")
    return {"shape": torch.tensor(list(w.shape), dtype=torch.int64), "compressed": w[mask].contiguous(),
            "bitmask": torch.from_numpy(bits), "row_offsets": (torch.cumsum(count, 0) - count).to(torch.int64)}


def decompress_bitmask(parts: dict):
    """The dense W [out, in] in the dtype of `compressed`; `row_offsets` is not needed (the bits give the order)."""
    import numpy as np
    import torch

    rows, columns = (int(v) for v in parts["shape"].reshape(-1))
    mask = np.unpackbits(parts["bitmask"].numpy(), axis=-1, count=columns, bitorder="little").astype(bool)
    if int(mask.sum()) != parts["compressed"].numel():
        raise UserError(f"bitmask and values disagree: {int(mask.sum())} bits set, {parts['compressed'].numel()} values")
    dense = torch.zeros(rows, columns, dtype=parts["compressed"].dtype)
    dense[torch.from_numpy(mask)] = parts["compressed"].reshape(-1)
    return dense


def compress_24(w) -> dict:
    import numpy as np
    import torch

    from absorbdeploy.masks import is_nm

    rows, columns = w.shape
    if not is_nm(w, 2, 4):
        raise UserError("sparse-24-bitmask refused: a tensor is not 2:4 sparse (some group of 4 inputs has fewer than 2 zeros); "
                        "the legacy format would silently re-prune it")
    groups = w.reshape(-1, 4)
    keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(1, groups.abs().float().topk(2, dim=1).indices, True)
    keep = keep.view(rows, columns)
    bits = np.packbits(keep.cpu().numpy(), axis=-1, bitorder="little")
    return {"shape": torch.tensor([rows, columns], dtype=torch.int64).reshape(-1, 1),
            "compressed": w[keep].reshape(rows, columns // 2).contiguous(), "bitmask": torch.from_numpy(bits)}


def decompress_24(parts: dict):
    return decompress_bitmask({"shape": parts["shape"], "bitmask": parts["bitmask"], "compressed": parts["compressed"].reshape(-1)})


def decode(parts: dict, layout: str):
    """One compressed module's parts -> its dense weight."""
    return decompress_24(parts) if layout == "sparse-24-bitmask" else decompress_bitmask(parts)


def encode(w, layout: str) -> dict:
    return compress_24(w) if layout == "sparse-24-bitmask" else compress_bitmask(w)


# --------------------------------------------------------------------------- shards (tensor parallelism, fused layers)

_POPCOUNT = None


def _popcount(bytes_):
    """Set bits per uint8, as int64 (a 256-entry table)."""
    import torch

    global _POPCOUNT
    if _POPCOUNT is None:
        _POPCOUNT = torch.tensor([bin(i).count("1") for i in range(256)], dtype=torch.int64)
    return _POPCOUNT[bytes_.long()]


def slice_rows(parts: dict, start: int, stop: int) -> dict:
    """Output rows [start, stop) of a sparse-bitmask matrix (a column-parallel shard): its bitmask rows and the values
    between their row offsets; nothing is decoded."""
    import torch

    offsets, values = parts["row_offsets"], parts["compressed"]
    first = int(offsets[start]) if start < offsets.numel() else values.numel()
    last = int(offsets[stop]) if stop < offsets.numel() else values.numel()
    columns = int(parts["shape"].reshape(-1)[1])
    return {"shape": torch.tensor([stop - start, columns], dtype=torch.int64), "compressed": values[first:last],
            "bitmask": parts["bitmask"][start:stop], "row_offsets": offsets[start:stop] - first}


def slice_columns(parts: dict, start: int, stop: int) -> dict:
    """Input columns [start, stop) of every row (a row-parallel shard); `start` and `stop` must fall on bytes of the
    bitmask (multiples of 8, or `stop` the last column). Every row's values are cut at the shard boundary by counting
    the set bits before and inside the range; nothing is decoded."""
    import torch

    columns = int(parts["shape"].reshape(-1)[1])
    if start % 8 or (stop % 8 and stop != columns):
        raise ValueError(f"a row-parallel shard must start and end on a byte of the bitmask, got columns [{start}, {stop})")
    bitmask = parts["bitmask"]
    before = _popcount(bitmask[:, : start // 8]).sum(1)
    inside = _popcount(bitmask[:, start // 8 : (stop + 7) // 8]).sum(1)
    offsets = torch.cumsum(inside, 0) - inside
    gather = torch.repeat_interleave(parts["row_offsets"] + before - offsets, inside) + torch.arange(int(inside.sum()))
    return {"shape": torch.tensor([bitmask.shape[0], stop - start], dtype=torch.int64),
            "compressed": parts["compressed"][gather], "bitmask": bitmask[:, start // 8 : (stop + 7) // 8].contiguous(),
            "row_offsets": offsets}


def concat_rows(shards: list[dict]) -> dict:
    """Stack matrices with the same input size along their output rows (q|k|v, gate|up): values concatenated, each
    shard's row offsets shifted by the non-zeros before it."""
    import torch

    columns = {int(s["shape"].reshape(-1)[1]) for s in shards}
    if len(columns) != 1:
        raise ValueError(f"fused shards must share their input size, got {sorted(columns)}")
    shifts, total = [], 0
    for s in shards:
        shifts.append(s["row_offsets"] + total)
        total += s["compressed"].numel()
    rows = sum(s["bitmask"].shape[0] for s in shards)
    return {"shape": torch.tensor([rows, columns.pop()], dtype=torch.int64),
            "compressed": torch.cat([s["compressed"] for s in shards]),
            "bitmask": torch.cat([s["bitmask"] for s in shards]), "row_offsets": torch.cat(shifts)}
