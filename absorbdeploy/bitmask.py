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
