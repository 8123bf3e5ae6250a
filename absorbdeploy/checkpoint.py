"""A checkpoint directory on disk, read and checked without loading a model (no torch import at module level).

- `read_header`: a safetensors file's header, its offsets checked against the file's size (the one header parser).
  `check_index`: every file and tensor that `model.safetensors.index.json` names exists. Both run in preflight, for in-memory and streaming runs alike.
- `stored_layout`: what `quantization_config` declares. Dense weights (also under a compressed-tensors config that
  only describes sparsity, which is then dropped) and the bitmask layouts we decode (compressed-tensors
  `sparse-bitmask` / `sparse-24-bitmask` without quantization, our served-sparse format) are accepted; every other
  quantization (AWQ, GPTQ, FP8, quantized compressed-tensors, ...) is refused: pruning its dequantised weights and
  writing them back as 16-bit would silently be a different model. compressed-tensors configs follow one table,
  `COMPRESSED_TENSORS_SPARSITY`.
- `tensor_table`: the logical tensors ({name: (dtype, shape)}), a compressed module's parts counted as its `.weight`.
- `ShardIndex`: reads named tensors from the shards, decoding compressed modules to dense.
- `consistency_problems`: the model's expected tensors against the ones on disk (missing, extra, wrong shape), pure.
"""

import json
import re
import struct
from pathlib import Path

from absorbdeploy.errors import UserError
from absorbdeploy.sparse.codec import LAYOUTS, PARTS, SERVED_SPARSE_METHOD, PackedFormatError, decode

INDEX = "model.safetensors.index.json"
FLOAT_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}
ALWAYS_IGNORABLE = (r"rotary_emb\.inv_freq$", r"(^|\.)position_ids$")  # stale buffers transformers drops too


def read_header(file: Path) -> dict:
    """Validate a safetensors header and offsets against the file size; returns the header."""
    try:
        size = file.stat().st_size
        with open(file, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ValueError("shorter than its 8-byte header length")
            (n,) = struct.unpack("<Q", head)
            if n > min(size - 8, 100_000_000):
                raise ValueError("header length exceeds the file")
            header = json.loads(f.read(n))
    except PermissionError:
        raise UserError(f"cannot read {file}: permission denied") from None
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise UserError(f"corrupt or truncated safetensors file {file}: {e}; re-download or re-save the model") from None
    if not isinstance(header, dict):
        raise UserError(f"corrupt safetensors file {file}: its header is not a JSON object")
    data_size = size - 8 - n
    for key, info in header.items():
        if key == "__metadata__":
            continue
        if not isinstance(info, dict) or not isinstance(info.get("data_offsets"), list) or info["data_offsets"][1] > data_size:
            raise UserError(f"corrupt or truncated safetensors file {file}: tensor {key} lies past the end of the file")
    return header


def weight_files(folder: Path) -> list[Path]:
    """The shards the checkpoint consists of: those the index names when there is one, else every *.safetensors."""
    index = folder / INDEX
    if index.is_file():
        return sorted({folder / f for f in _weight_map(folder).values()})
    return sorted(folder.glob("*.safetensors"))


def _weight_map(folder: Path) -> dict[str, str]:
    try:
        data = json.loads((folder / INDEX).read_text())
        weight_map = data["weight_map"]
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise TypeError
    except (OSError, ValueError, KeyError, TypeError):
        raise UserError(f"{folder / INDEX} is not a valid safetensors index (no weight_map of tensor -> file)") from None
    return weight_map


def check_index(folder: Path) -> dict[Path, dict]:
    """Every shard's header; with an index, every file it names must exist and hold the tensors it maps to it."""
    folder = Path(folder)
    if not (folder / INDEX).is_file():
        return {file: read_header(file) for file in weight_files(folder)}
    by_file: dict[str, list[str]] = {}
    for tensor, file in _weight_map(folder).items():
        by_file.setdefault(file, []).append(tensor)
    headers = {}
    for file, tensors in sorted(by_file.items()):
        path = folder / file
        if not path.is_file():
            raise UserError(f"{folder}: {INDEX} maps {len(tensors)} tensors (e.g. {tensors[0]}) to {file}, which is "
                            "missing; the checkpoint is incomplete")
        headers[path] = read_header(path)
        absent = [t for t in tensors if t not in headers[path]]
        if absent:
            raise UserError(f"{folder}: {INDEX} says {file} holds {absent[0]}, but it does not; the checkpoint is damaged")
    return headers


# compressed-tensors sparsity_config.format -> the layout we read (DENSE: the weights are stored dense, the config only
# describes their zeros). A config with quantization (non-empty config_groups, or a quantization format other than
# dense) or any other sparsity format (marlin-24, ...) is refused.
DENSE = "dense"
COMPRESSED_TENSORS_SPARSITY = {None: DENSE, "dense": DENSE, "sparse-bitmask": "sparse-bitmask",
                               "sparse-24-bitmask": "sparse-24-bitmask"}
COMPRESSED_TENSORS_DENSE_FORMATS = (None, "dense")


def stored_layout(config: dict, name: str) -> str | None:
    """None for dense weights with no quantization_config; DENSE for dense weights under a quantization_config that
    only describes sparsity (load them without it); a bitmask layout name for a checkpoint we decode. UserError for
    anything else."""
    quant = config.get("quantization_config")
    if quant is None:
        return None
    method = quant.get("quant_method") if isinstance(quant, dict) else None
    if method == SERVED_SPARSE_METHOD:
        return "sparse-bitmask"
    if method == "compressed-tensors":
        sparsity = quant.get("sparsity_config") or {}
        layout = sparsity.get("format") if isinstance(sparsity, dict) else "?"
        quantized = bool(quant.get("config_groups")) or quant.get("format") not in COMPRESSED_TENSORS_DENSE_FORMATS
        if not quantized and isinstance(layout, (str, type(None))) and layout in COMPRESSED_TENSORS_SPARSITY:
            return COMPRESSED_TENSORS_SPARSITY[layout]
        what = (f"quantized weights (config_groups, format {quant.get('format')!r})" if quantized
                else f"sparsity format {layout!r}")
        raise UserError(f"{name}: config.json declares compressed-tensors with {what}, which absorbdeploy cannot prune "
                        "faithfully; pass the original unquantized (bf16/fp16/fp32) checkpoint")
    details = ", ".join(f"{k} {quant[k]}" for k in ("bits", "group_size", "fmt") if isinstance(quant, dict) and k in quant)
    raise UserError(f"{name}: config.json declares quantization_config quant_method {method!r}"
                    f"{f' ({details})' if details else ''}; absorbdeploy prunes unquantized weights and cannot read this "
                    "layout faithfully; pass the original bf16/fp16/fp32 checkpoint")


def tensor_table(headers: dict[Path, dict]) -> dict[str, tuple[str, tuple[int, ...]]]:
    """{logical name: (safetensors dtype, shape)}; a compressed module `m` appears as `m.weight` with its dense shape."""
    table, compressed = {}, {}
    for file, header in headers.items():
        for key, info in header.items():
            if key == "__metadata__":
                continue
            module, _, part = key.rpartition(".")
            if part in PARTS and module:
                compressed.setdefault(module, {})[part] = (file, key, info)
            else:
                table[key] = (info["dtype"], tuple(info["shape"]))
    for module, parts in compressed.items():
        if "bitmask" not in parts or "compressed" not in parts:  # an ordinary tensor that happens to end in .shape etc.
            table.update({key: (info["dtype"], tuple(info["shape"])) for _, key, info in parts.values()})
            continue
        if "shape" in parts:
            shape = _stored_shape(*parts["shape"][:2])
        else:
            shape = (parts["bitmask"][2]["shape"][0], 8 * parts["bitmask"][2]["shape"][1])
        table[f"{module}.weight"] = (parts["compressed"][2]["dtype"], shape)
    return table


def _stored_shape(file: Path, key: str) -> tuple[int, ...]:
    """A compressed module's dense shape: the few int64 values of its `.shape` tensor."""
    from safetensors import safe_open

    with safe_open(str(file), framework="numpy") as f:
        return tuple(int(v) for v in f.get_tensor(key).reshape(-1))


def source_dtype(table: dict) -> str:
    """float16 or bfloat16 when every floating-point tensor is that 16-bit type, else float32."""
    kinds = {FLOAT_DTYPES.get(dtype) for dtype, _ in table.values()} - {None}
    return kinds.pop() if len(kinds) == 1 else "float32"


def consistency_problems(expected: dict, on_disk: dict, tied: dict[str, str], ignorable=()) -> list[str]:
    """Disagreements between the tensors a config implies ({name: shape}) and those stored ({name: shape}).

    `tied` maps an alias to the tensor it shares (lm_head.weight -> model.embed_tokens.weight) when the config ties
    them: the alias may then be absent from disk. Stored tensors matching an `ignorable` regex are stale buffers.
    """
    patterns = [re.compile(p) for p in (*ALWAYS_IGNORABLE, *ignorable)]
    problems = []
    for name, shape in expected.items():
        if name not in on_disk:
            if not (name in tied and tied[name] in on_disk):
                problems.append(f"{name} is missing from the checkpoint")
        elif tuple(on_disk[name]) != tuple(shape):
            problems.append(f"{name} has shape {list(on_disk[name])} on disk but the config implies {list(shape)}")
    extra = [n for n in on_disk if n not in expected and not any(p.search(n) for p in patterns)]
    problems += [f"{n} is on disk but the config has no such tensor" for n in sorted(extra)]
    return problems


class ShardIndex:
    """tensor name -> safetensors file, for one checkpoint directory; compressed modules are decoded on read."""

    def __init__(self, folder: Path, layout: str | None = None, headers: dict[Path, dict] | None = None):
        """`headers`: check_index's result for `folder`, when the caller has it (the shards are then not re-opened)."""
        from safetensors import safe_open

        self.folder, self.layout = Path(folder), layout
        self.map: dict[str, Path] = {}
        if (self.folder / INDEX).is_file():
            self.map = {k: self.folder / v for k, v in _weight_map(self.folder).items()}
        elif headers is not None:
            self.map = {k: file for file, header in sorted(headers.items()) for k in header if k != "__metadata__"}
        else:
            for file in sorted(self.folder.glob("*.safetensors")):
                with safe_open(str(file), framework="pt") as f:
                    self.map.update({k: file for k in f.keys()})
        self.compressed = ({k[: -len(".bitmask")] + ".weight" for k in self.map if k.endswith(".bitmask")}
                           if layout in LAYOUTS else set())

    @property
    def names(self) -> list[str]:
        """Every logical tensor: stored dense ones, and each compressed module's `.weight`."""
        parts = {f"{m[: -len('.weight')]}.{p}" for m in self.compressed for p in PARTS}
        return sorted((set(self.map) - parts) | self.compressed)

    def __contains__(self, name: str) -> bool:
        return name in self.map or name in self.compressed

    def read(self, names) -> dict:
        raw_names = []
        for name in names:
            if name in self.compressed:
                module = name[: -len(".weight")]
                raw_names += [f"{module}.{p}" for p in PARTS if f"{module}.{p}" in self.map]
            elif name in self.map:
                raw_names.append(name)
            else:
                raise UserError(f"{self.folder} lacks tensor {name}; the checkpoint is incomplete")
        raw = self._read_raw(raw_names)
        result = {}
        for name in names:
            module = name[: -len(".weight")]
            try:
                result[name] = (decode({p: raw[f"{module}.{p}"] for p in PARTS if f"{module}.{p}" in raw}, self.layout)
                                if name in self.compressed else raw[name])
            except PackedFormatError as e:
                raise UserError(f"{self.folder}: packed module {module} is damaged ({e})") from None
        return result

    def _read_raw(self, names) -> dict:
        from safetensors import SafetensorError, safe_open

        by_file: dict[Path, list[str]] = {}
        for name in names:
            by_file.setdefault(self.map[name], []).append(name)
        tensors = {}
        for file, keys in by_file.items():
            try:
                with safe_open(str(file), framework="pt") as f:
                    tensors.update({k: f.get_tensor(k) for k in keys})
            except (OSError, SafetensorError) as e:
                raise UserError(f"cannot read {file} during the run ({e.__class__.__name__}: {e}); "
                                "the checkpoint changed or became unreadable") from None
        return tensors
