"""The files every exporter writes and reads back, shared by the formats in exporters/ (the registry, FORMATS, lives
in exporters/__init__.py; this module is the writers it never needs to import).

- `ShardWriter`: safetensors shards written as tensors arrive, then the index; `parse_size`, `streaming_shard_bytes`.
- `write_checkpoint`: a plain `save_pretrained` checkpoint; `write_packed` / `decoded_shards`: the bitmask layouts.
- `write_sidecar` / `read_sidecar` (absorbdeploy.json), `list_files`, `describe` and its sparsity `Audit`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from absorbdeploy.errors import UserError

if TYPE_CHECKING:
    from absorbdeploy.exporters import ExportSpec

SIDECAR = "absorbdeploy.json"


def parse_size(text: str) -> int:
    """'5GB' -> bytes (recipe values such as export.max_shard_size are checked with the same pattern)."""
    import re

    number, unit = re.fullmatch(r"(\d+(?:\.\d+)?)\s*(\w+)", text).groups()
    scale = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30}[unit]
    return int(float(number) * scale)


STREAMING_SHARD_CAP = 512 * 2**20


def streaming_shard_bytes(max_shard_size: str) -> int:
    """A shard's tensors wait in memory until the shard is written, so streaming mode caps shards at 512 MiB whatever
    export.max_shard_size asks for (vLLM and transformers read any number of shards)."""
    return min(parse_size(max_shard_size), STREAMING_SHARD_CAP)


class ShardWriter:
    """Writes tensors into `<stem>-XXXXX-of-YYYYY.safetensors` shards as they arrive, then `<stem>.safetensors.index.json`;
    one shard is `<stem>.safetensors` with no index, unless `always_index` (the bitmask format, whose config names its
    weights through the index)."""

    def __init__(self, folder: Path, max_shard_bytes: int, stem: str = "model", always_index: bool = False):
        self.folder, self.limit, self.stem, self.always_index = Path(folder), max_shard_bytes, stem, always_index
        self.folder.mkdir(parents=True, exist_ok=True)
        self.pending, self.size, self.files, self.map, self.total = {}, 0, [], {}, 0

    def add(self, tensors: dict, group: bool = False) -> None:
        """Add tensors; with `group`, they all land in the same shard (a compressed module's parts stay together)."""
        items = [tensors] if group else [{k: v} for k, v in tensors.items()]
        for part in items:
            nbytes = sum(t.numel() * t.element_size() for t in part.values())
            if self.pending and self.size + nbytes > self.limit:
                self._flush()
            self.pending.update({k: t.detach().to("cpu").contiguous() for k, t in part.items()})
            self.size += nbytes
            self.total += nbytes

    def _flush(self) -> None:
        from safetensors.torch import save_file

        name = f"part-{len(self.files):05d}.safetensors"
        save_file(self.pending, self.folder / name, metadata={"format": "pt"})
        self.files.append(name)
        self.map.update({k: name for k in self.pending})
        self.pending, self.size = {}, 0

    def finish(self) -> None:
        if self.pending:
            self._flush()
        n, indexed = len(self.files), len(self.files) > 1 or self.always_index
        final = {old: (f"{self.stem}-{i + 1:05d}-of-{n:05d}.safetensors" if indexed else f"{self.stem}.safetensors")
                 for i, old in enumerate(self.files)}
        for old, new in final.items():
            (self.folder / old).rename(self.folder / new)
        self.map = {k: final[v] for k, v in self.map.items()}
        if indexed:
            index = {"metadata": {"total_size": self.total}, "weight_map": dict(sorted(self.map.items()))}
            (self.folder / f"{self.stem}.safetensors.index.json").write_text(json.dumps(index, indent=2))


def unique_state_dict(model, dtype) -> dict:
    """The state dict on CPU in `dtype`, tied tensors (lm_head = embed_tokens) once, as save_pretrained stores them.
    Tensors still on the meta device (streamed blocks, already written) are skipped."""
    seen, result = set(), {}
    for name, tensor in model.state_dict().items():
        if tensor.is_meta:
            continue
        key = (tensor.data_ptr(), tuple(tensor.shape))
        if key in seen:
            continue
        seen.add(key)
        result[name] = tensor.detach().to("cpu", dtype).contiguous()
    return result


def write_checkpoint(model, tokenizer, out: Path, spec: ExportSpec) -> None:
    """A plain `save_pretrained` checkpoint in spec.dtype (dense storage, zeros included). Streaming: the pruned
    blocks are already in spec.streamed's shards; the rest is added, then the index."""
    import torch

    out.mkdir(parents=True, exist_ok=True)
    if spec.streamed is not None:
        spec.streamed.add(unique_state_dict(model, getattr(torch, spec.dtype)))
        spec.streamed.finish()
        model.config.to_json_file(out / "config.json")
        model.generation_config.save_pretrained(out)
    else:  # a converted copy of the state dict: casting the model itself would also round its rotary buffers
        state = unique_state_dict(model, getattr(torch, spec.dtype))
        model.save_pretrained(out, state_dict=state, max_shard_size=spec.max_shard_size)
        del state
    tokenizer.save_pretrained(out)
    config = json.loads((out / "config.json").read_text())
    config["dtype"] = spec.dtype  # what `vllm serve DIR` and from_pretrained(dtype="auto") will use
    (out / "config.json").write_text(json.dumps(config, indent=2))


def base_config(model, dtype: str) -> dict:
    """config.json as save_pretrained writes it (architectures included), in the export dtype."""
    config = model.config.to_dict()
    config["architectures"] = [type(model).__name__]
    config["dtype"] = dtype
    return config


def write_packed(model, tokenizer, out: Path, spec: ExportSpec, layout: str, config: dict, stem: str = "model",
                 always_index: bool = False, values: str | None = None) -> None:
    """Shards of the state dict in spec.dtype with every prunable weight replaced by its bitmask parts (sparse/codec.py;
    values in spec.dtype, or in `values`: "bfloat16", "float16", "int8" with per-channel scales quantized from the
    exported weights; a module's parts stay in one shard), named as ShardWriter(stem, always_index) names them, then
    config.json, the generation config and the tokenizer. In streaming mode the tensors come shard by shard from the
    finished checkpoint (spec.checkpoint)."""
    import torch

    from absorbdeploy.sparse.codec import PackedFormatError, encode

    if spec.checkpoint is None:
        source = unique_state_dict(model, getattr(torch, spec.dtype)).items()
    else:
        from safetensors.torch import load_file

        source = (item for file in sorted(Path(spec.checkpoint).glob("*.safetensors")) for item in load_file(str(file)).items())
    limit = streaming_shard_bytes(spec.max_shard_size) if spec.checkpoint else parse_size(spec.max_shard_size)
    writer, prunable = ShardWriter(out, limit, stem, always_index), set(spec.prunable)
    for name, t in source:
        if name in prunable:
            try:
                parts = encode(t, layout, values)
            except PackedFormatError as e:  # a tensor the layout cannot hold (2:4 asked of a tensor that is not)
                raise UserError(str(e)) from None
            writer.add({f"{name[: -len('.weight')]}.{k}": v for k, v in parts.items()}, group=True)
        else:
            writer.add({name: t})
    writer.finish()
    (out / "config.json").write_text(json.dumps(config, indent=2, default=str))
    model.generation_config.save_pretrained(out)
    tokenizer.save_pretrained(out)


def decoded_shards(out_dir, layout: str):
    """Every stored tensor of a packed export, bitmask modules decoded to dense, one shard at a time."""
    from safetensors.torch import load_file

    from absorbdeploy.sparse.codec import ALL_PARTS, decode

    for file in sorted(Path(out_dir).glob("*.safetensors")):
        raw = load_file(str(file))
        modules = {k[: -len(".bitmask")] for k in raw if k.endswith(".bitmask")}
        decoded = {k: v for k, v in raw.items() if k not in {f"{m}.{p}" for m in modules for p in ALL_PARTS}}
        for m in modules:
            decoded[f"{m}.weight"] = decode({p: raw[f"{m}.{p}"] for p in ALL_PARTS if f"{m}.{p}" in raw}, layout)
        yield decoded


def list_files(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_size for p in sorted(folder.rglob("*")) if p.is_file()}


def write_sidecar(folder: Path, spec: ExportSpec, fmt: str, **extra) -> None:
    payload = {"format": fmt, "dtype": spec.dtype, "nm": list(spec.nm) if spec.nm else None,
               "prunable": list(spec.prunable), **spec.sidecar, **extra}
    (folder / SIDECAR).write_text(json.dumps(payload, indent=1))


def read_sidecar(folder: Path) -> dict:
    path = Path(folder) / SIDECAR
    if not path.is_file():
        raise UserError(f"{folder} has no {SIDECAR}; it was not written by absorbdeploy")
    return json.loads(path.read_text())


def describe_export(out_dir, shards, **extra) -> dict:
    """What every format's `describe` reports: files, bytes and the sparsity audit of its stored prunable weights,
    read one shard at a time from `shards` (the format's `tensors(out_dir)`)."""
    meta = read_sidecar(out_dir)
    files = list_files(Path(out_dir))
    audit = Audit(meta["prunable"], tuple(meta["nm"]) if meta.get("nm") else None)
    for shard in shards:
        audit.add(shard)
    return {"format": meta["format"], "files": files, "bytes": sum(files.values()), "audit": audit.result(), **extra}


class Audit:
    """Sparsity over the prunable set, accumulated from tensors read back from disk."""

    def __init__(self, prunable, nm):
        self.prunable, self.nm = set(prunable), nm
        self.per_tensor, self.zeros, self.total, self.nm_ok = {}, 0, 0, True

    def add(self, tensors: dict) -> None:
        from absorbdeploy.masks import is_nm

        for name, t in tensors.items():
            if name in self.prunable and name not in self.per_tensor:
                z = int((t == 0).sum())
                self.per_tensor[name] = z / t.numel()
                self.zeros, self.total = self.zeros + z, self.total + t.numel()
                self.nm_ok = self.nm_ok and (self.nm is None or is_nm(t, *self.nm))

    def result(self) -> dict:
        missing = self.prunable - set(self.per_tensor)
        if missing:
            raise UserError(f"the export lacks {len(missing)} pruned tensors (e.g. {sorted(missing)[0]}); it is incomplete")
        result = {"zeros": self.zeros, "weights": self.total, "sparsity": self.zeros / self.total if self.total else 0.0,
                  "per_tensor": dict(sorted(self.per_tensor.items()))}
        if self.nm is not None:
            result["nm_valid"] = self.nm_ok
        return result
