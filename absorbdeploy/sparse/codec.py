"""The bitmask codec and the served-sparse format's constants: a pruned weight matrix as its non-zeros plus one bit
per weight (pure functions over tensors; imports nothing of absorbdeploy's, so every door and exporter can share it).

Layout of compressed-tensors <= 0.14 (export §2.2), also what our served-sparse format and the CPU kernel read:
  sparse-bitmask     shape int64 [2] | compressed [nnz] (row-major non-zeros, the weight's dtype)
                     | bitmask uint8 [out, ceil(in/8)] | row_offsets int64 [out] (index of each row's first non-zero)
  sparse-24-bitmask  shape int64 [2, 1] | compressed [out, in/2] | bitmask uint8 [out, in/8]
Bits are packed little-endian along the input dimension (numpy.packbits(bitorder="little")): bit j of row r is
W[r, j] != 0. `unpack_bits` is the one decoder of that packing in Python (the C++ kernel has its own, kernels/isa.h).
2:4 keeps the two largest |w| of every group of 4 whatever the tensor holds, so `compress_24` refuses a tensor that is
not 2:4 rather than silently re-pruning it.

The served-sparse `bitmask/` export stores the sparse-bitmask parts under `<module>.<part>` and describes them in
config.json: model_type `absorbdeploy_<base>` and a `quantization_config` (`FormatConfig`) that both runtime doors
(transformers: hf.py, vLLM: vllm.py) read the same way. Its values are bf16/fp16, or int8 with one fp32 scale per output
channel (`weight_scale` [out], symmetric, from the kept weights only: `quantize_values`), W[r] = weight_scale[r] * q[r].
"""

from dataclasses import dataclass, field

# The tensors of one packed module, by suffix, and their dtypes (None: the values dtype, one of VALUES_DTYPES).
PART_DTYPES = {"shape": "int64", "compressed": None, "bitmask": "uint8", "row_offsets": "int64"}
PARTS = tuple(PART_DTYPES)
SCALE_PART, SCALE_DTYPE = "weight_scale", "float32"  # int8 values only: fp32 [out], one scale per output channel
SCALE_LAYOUT = "per-channel"  # quantization_config.scale_layout of int8 values (symmetric, no zero point)
# quantization_config.input_activations of W8A8: each Linear's x quantized to int8 per token at run time (symmetric,
# scale max |x[t]| / 127), int8 values only; absent = x stays in the runtime's float dtype
INT8_PER_TOKEN = "int8-per-token"
LAYOUTS = ("sparse-bitmask", "sparse-24-bitmask")
SERVED_SPARSE_METHOD = "absorbdeploy-bitmask"  # quant_method of our served-sparse format (same tensors as sparse-bitmask)
MODEL_TYPE_PREFIX = "absorbdeploy_"  # its model_type: absorbdeploy_<base>, which plain transformers refuses
VALUES_DTYPES = ("bfloat16", "float16", "int8")  # dtypes of `compressed` the kernel reads (kernels/isa.h ValueType)
QUANTIZED_VALUES = ("int8",)  # values stored with SCALE_PART
ALL_PARTS = (*PARTS, SCALE_PART)  # every suffix a packed tensor may have
# Version 2 names its weights bitmask-XXXXX-of-YYYYY.safetensors through WEIGHTS_INDEX, never model.safetensors, so a
# loader that ignores our model type finds no weights instead of building random ones; version 1 (model.safetensors)
# is still read.
FORMAT_VERSION = 2
READ_VERSIONS = (1, 2)
WEIGHTS_STEM = "bitmask"
WEIGHTS_INDEX = f"{WEIGHTS_STEM}.safetensors.index.json"


class PackedFormatError(ValueError):
    """Packed tensors that are inconsistent or cannot be encoded; the message names what and why."""


@dataclass(frozen=True)
class FormatConfig:
    """The `quantization_config` of a `bitmask/` export: which Linears are packed (state-dict module names), in what
    layout and values dtype, for int8 values the layout of their scales (`scale_layout`, SCALE_LAYOUT) and whether
    their inputs are quantized too (`input_activations`: INT8_PER_TOKEN, W8A8). `from_dict` raises PackedFormatError
    for a layout, dtype, scale layout, activation scheme or version it does not know."""

    targets: tuple[str, ...] = ()
    format: str = "sparse-bitmask"
    values_dtype: str = "bfloat16"
    version: int = FORMAT_VERSION
    scale_layout: str | None = None
    input_activations: str | None = None
    quant_method: str = field(default=SERVED_SPARSE_METHOD, init=False)

    def __post_init__(self):
        if self.scale_layout is None and self.values_dtype in QUANTIZED_VALUES:
            object.__setattr__(self, "scale_layout", SCALE_LAYOUT)

    @property
    def quantize_x(self) -> bool:
        """W8A8: the kernel quantizes each packed Linear's input per token (INT8_PER_TOKEN)."""
        return self.input_activations == INT8_PER_TOKEN

    @property
    def parts(self) -> tuple[str, ...]:
        """The tensors stored per packed module."""
        return parts_for(self.values_dtype)

    @classmethod
    def from_dict(cls, config: dict) -> "FormatConfig":
        config = dict(config or {})
        targets = config.get("targets") or []
        if not isinstance(targets, list) or not all(isinstance(t, str) and t for t in targets):
            raise PackedFormatError(f"{SERVED_SPARSE_METHOD}: quantization_config.targets must be a list of module "
                                    f"names, got {str(targets)[:80]!r}")
        made = cls(tuple(targets), config.get("format", "sparse-bitmask"), config.get("values_dtype", "bfloat16"),
                   config.get("version", FORMAT_VERSION), config.get("scale_layout"), config.get("input_activations"))
        quantized = made.values_dtype in QUANTIZED_VALUES
        if config.get("scale_layout") != (SCALE_LAYOUT if quantized else None):
            raise PackedFormatError(f"{SERVED_SPARSE_METHOD}: values_dtype {made.values_dtype!r} with scale_layout "
                                    f"{made.scale_layout!r} (this absorbdeploy reads int8 values with "
                                    f"{SCALE_LAYOUT!r} scales, 16-bit values with none)")
        if made.input_activations not in (None, INT8_PER_TOKEN) or (made.quantize_x and not quantized):
            raise PackedFormatError(f"{SERVED_SPARSE_METHOD}: input_activations {made.input_activations!r} with "
                                    f"values_dtype {made.values_dtype!r} (this absorbdeploy reads "
                                    f"{INT8_PER_TOKEN!r} with int8 values, or none)")
        if made.format != "sparse-bitmask" or made.values_dtype not in VALUES_DTYPES or made.version not in READ_VERSIONS:
            raise PackedFormatError(f"{SERVED_SPARSE_METHOD}: unsupported format {made.format!r}, values_dtype "
                                    f"{made.values_dtype!r} or version {made.version!r} (this absorbdeploy reads "
                                    f"sparse-bitmask, {' or '.join(VALUES_DTYPES)}, versions "
                                    f"{', '.join(map(str, READ_VERSIONS))})")
        return made

    def to_dict(self) -> dict:
        scales = {"scale_layout": self.scale_layout} if self.scale_layout else {}
        if self.input_activations:
            scales["input_activations"] = self.input_activations
        return {"quant_method": self.quant_method, "format": self.format, "values_dtype": self.values_dtype, **scales,
                "targets": list(self.targets), "version": self.version}


def parts_for(values_dtype: str) -> tuple[str, ...]:
    """The parts of one packed module with values of `values_dtype` (PARTS, plus SCALE_PART for int8)."""
    return PARTS + ((SCALE_PART,) if values_dtype in QUANTIZED_VALUES else ())


def part_dtype(part: str, values_dtype: str) -> str:
    """The torch dtype name a part is stored in when the values are `values_dtype`."""
    return SCALE_DTYPE if part == SCALE_PART else PART_DTYPES[part] or values_dtype


def quantize_values(w):
    """Symmetric per-output-channel int8 of a pruned W [out, in] (any float dtype): scales fp32 [out] = max |W[r]| /
    127 over the kept weights, q int8 [out, in] = round(W / scale) in [-127, 127]. A kept weight never rounds to zero
    (|q| >= 1 where W != 0), so q's non-zeros are W's and the bitmask stays the pruning mask; an all-zero row gets
    scale 1. Returns (q, scales). Standard RTN weight quantization (as compressed-tensors' int8 channel scheme) applied
    after pruning, so pruned zeros do not set the range."""
    import torch

    w = w.float()
    scales = w.abs().amax(dim=1) / 127
    scales = torch.where(scales > 0, scales, torch.ones_like(scales))
    q = torch.round(w / scales.unsqueeze(1)).clamp(-127, 127)
    q = torch.where((q == 0) & (w != 0), torch.sign(w), q)
    return q.to(torch.int8), scales


def names_weights_index(quantization_config) -> bool:
    """Whether a `bitmask/` export's weights are named by WEIGHTS_INDEX (format version >= 2); the config may be the
    dict from config.json or transformers' object."""
    if isinstance(quantization_config, dict):
        method, version = quantization_config.get("quant_method"), quantization_config.get("version", 1)
    else:
        method, version = getattr(quantization_config, "quant_method", None), getattr(quantization_config, "version", 1)
    return method == SERVED_SPARSE_METHOD and isinstance(version, int) and version >= 2


def model_type_for(base: str) -> str:
    """llama -> absorbdeploy_llama."""
    return MODEL_TYPE_PREFIX + base


def base_model_type(model_type: str) -> str:
    """absorbdeploy_llama -> llama; any other model type unchanged."""
    return model_type[len(MODEL_TYPE_PREFIX):] if model_type.startswith(MODEL_TYPE_PREFIX) else model_type


def unpack_bits(bitmask, columns: int):
    """bitmask uint8 [rows, ceil(columns / 8)] -> bool [rows, columns], bit j of byte k is column 8k + j."""
    import torch

    bits = (bitmask.unsqueeze(-1) >> torch.arange(8, dtype=torch.uint8, device=bitmask.device)) & 1
    return bits.reshape(bitmask.shape[0], 8 * bitmask.shape[1])[:, :columns].bool()


def compress_bitmask(w) -> dict:
    """W [out, in] (any dtype) -> {shape, compressed [nnz] in W's dtype, bitmask uint8, row_offsets int64}; for int8
    values compress q of `quantize_values` and add its scales as SCALE_PART (`encode` does)."""
    import numpy as np
    import torch

    mask = w != 0
    count = mask.sum(dim=1)
    bits = np.packbits(mask.cpu().numpy(), axis=-1, bitorder="little")
    return {"shape": torch.tensor(list(w.shape), dtype=torch.int64), "compressed": w[mask].contiguous(),
            "bitmask": torch.from_numpy(bits), "row_offsets": (torch.cumsum(count, 0) - count).to(torch.int64)}


def decompress_bitmask(parts: dict):
    """The dense W [out, in] in the dtype of `compressed` (int8 values with SCALE_PART: fp32 q * scale); `row_offsets`
    is not needed (the bits give the order). Raises PackedFormatError when the bitmask's set bits and the number of
    values differ."""
    import torch

    rows, columns = (int(v) for v in parts["shape"].reshape(-1))
    mask = unpack_bits(parts["bitmask"].cpu(), columns)
    if int(mask.sum()) != parts["compressed"].numel():
        raise PackedFormatError(f"bitmask and values disagree: {int(mask.sum())} bits set, "
                                f"{parts['compressed'].numel()} values")
    dense = torch.zeros(rows, columns, dtype=parts["compressed"].dtype)
    dense[mask] = parts["compressed"].reshape(-1).cpu()
    if SCALE_PART in parts:
        return dense.float() * parts[SCALE_PART].float().reshape(-1, 1).cpu()
    return dense


def _is_24(w) -> bool:
    """At least 2 zeros in every group of 4 consecutive inputs of each row (masks.is_nm(w, 2, 4), kept here so that
    the codec imports nothing of ours)."""
    return w.shape[-1] % 4 == 0 and bool(((w.reshape(-1, 4) == 0).sum(dim=1) >= 2).all())


def compress_24(w) -> dict:
    """W [out, in] 2:4 sparse -> {shape [2, 1], compressed [out, in/2], bitmask}; PackedFormatError if not 2:4."""
    import numpy as np
    import torch

    rows, columns = w.shape
    if not _is_24(w):
        raise PackedFormatError("sparse-24-bitmask refused: a tensor is not 2:4 sparse (some group of 4 inputs has fewer "
                                "than 2 zeros); the legacy format would silently re-prune it")
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


def encode(w, layout: str, values: str | None = None) -> dict:
    """W [out, in] -> its packed parts in `layout`, values in W's dtype, or `values` ("bfloat16", "float16", "int8":
    int8 with scales, sparse-bitmask only). Raises PackedFormatError for int8 asked of another layout."""
    import torch

    if values in QUANTIZED_VALUES:
        if layout != "sparse-bitmask":
            raise PackedFormatError(f"int8 values are stored in the sparse-bitmask layout only, not {layout}")
        q, scales = quantize_values(w)
        return {**compress_bitmask(q), SCALE_PART: scales}
    if values is not None:
        w = w.to(getattr(torch, values))
    return compress_24(w) if layout == "sparse-24-bitmask" else compress_bitmask(w)


# --------------------------------------------------------------------------- shards (tensor parallelism, fused layers)

def row_popcounts(bitmask):
    """Set bits per row of a uint8 [rows, bytes] bitmask, as int64 [rows] (numpy.bitwise_count, vectorised; rows read
    as the widest unsigned words their length allows, which halves the time of a 1.1B model's check)."""
    import numpy as np
    import torch

    array = bitmask.contiguous().cpu().numpy()
    for word in (np.uint64, np.uint32, np.uint16):
        if array.shape[1] % np.dtype(word).itemsize == 0:
            array = array.view(word)
            break
    return torch.from_numpy(np.bitwise_count(array).sum(axis=1, dtype=np.int64))


def slice_rows(parts: dict, start: int, stop: int) -> dict:
    """Output rows [start, stop) of a sparse-bitmask matrix (a column-parallel shard): its bitmask rows and the values
    between their row offsets; nothing is decoded."""
    import torch

    offsets, values = parts["row_offsets"], parts["compressed"]
    first = int(offsets[start]) if start < offsets.numel() else values.numel()
    last = int(offsets[stop]) if stop < offsets.numel() else values.numel()
    columns = int(parts["shape"].reshape(-1)[1])
    scales = {SCALE_PART: parts[SCALE_PART][start:stop]} if SCALE_PART in parts else {}
    return {"shape": torch.tensor([stop - start, columns], dtype=torch.int64), "compressed": values[first:last],
            "bitmask": parts["bitmask"][start:stop], "row_offsets": offsets[start:stop] - first, **scales}


def slice_columns(parts: dict, start: int, stop: int) -> dict:
    """Input columns [start, stop) of every row (a row-parallel shard); `start` and `stop` must fall on bytes of the
    bitmask (multiples of 8, or `stop` the last column). Every row's values are cut at the shard boundary by counting
    the set bits before and inside the range; nothing is decoded."""
    import torch

    columns = int(parts["shape"].reshape(-1)[1])
    if start % 8 or (stop % 8 and stop != columns):
        raise ValueError(f"a row-parallel shard must start and end on a byte of the bitmask, got columns [{start}, {stop})")
    bitmask = parts["bitmask"]
    before = row_popcounts(bitmask[:, : start // 8])
    inside = row_popcounts(bitmask[:, start // 8 : (stop + 7) // 8])
    offsets = torch.cumsum(inside, 0) - inside
    gather = torch.repeat_interleave(parts["row_offsets"] + before - offsets, inside) + torch.arange(int(inside.sum()))
    scales = {SCALE_PART: parts[SCALE_PART]} if SCALE_PART in parts else {}  # a row's scale covers all its columns
    return {"shape": torch.tensor([bitmask.shape[0], stop - start], dtype=torch.int64),
            "compressed": parts["compressed"][gather], "bitmask": bitmask[:, start // 8 : (stop + 7) // 8].contiguous(),
            "row_offsets": offsets, **scales}


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
    scaled = {SCALE_PART in s for s in shards}
    if len(scaled) != 1:
        raise ValueError("fused shards must all have scales (int8 values) or none")
    scales = {SCALE_PART: torch.cat([s[SCALE_PART] for s in shards])} if scaled.pop() else {}
    return {"shape": torch.tensor([rows, columns.pop()], dtype=torch.int64),
            "compressed": torch.cat([s["compressed"] for s in shards]),
            "bitmask": torch.cat([s["bitmask"] for s in shards]), "row_offsets": torch.cat(shifts), **scales}
