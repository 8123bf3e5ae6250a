"""Stage 1b, load: the model and tokenizer of a `ModelSource` in fp32 (or the 16-bit compute dtype on CUDA), checked
against the files it came from (every tensor the config implies, no stray ones, tied pairs consistent), its weights
checked for non-finite values and values the export dtype cannot hold, then rounded once to the export dtype.
"""

import json
import os
from dataclasses import dataclass
from pathlib import Path

from absorbdeploy import checkpoint
from absorbdeploy.blocks import decoder_blocks
from absorbdeploy.errors import UserError
from absorbdeploy.source import ModelSource


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


def resolve_device(requested: str):
    import torch

    if requested == "cuda" or (requested == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise UserError("--device cuda was requested but no CUDA device is available; use --device cpu or auto")
        torch.backends.cuda.matmul.allow_tf32 = False  # Hessians and statistics stay true fp32
        torch.backends.cudnn.allow_tf32 = False
        return torch.device("cuda")
    return torch.device("cpu")


def check_device_present(requested: str) -> None:
    """--device cuda on a machine with no NVIDIA GPU, found without importing torch (preflight)."""
    if requested == "cuda" and not any(os.path.exists(p) for p in ("/dev/nvidia0", "/proc/driver/nvidia", "/dev/nvidiactl")):
        raise UserError("--device cuda was requested but this machine has no NVIDIA GPU; use --device cpu or auto")


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
    elif source.kind in ("gguf", "embedded"):
        model, tokenizer = _load_gguf(source)
    else:
        model, tokenizer = _load_directory(source, trust_remote_code)
    model = model.to(device=device, dtype=dtype or torch.float32).eval()
    model.requires_grad_(False)
    return LoadedModel(model, tokenizer, source, decoder_blocks(model, trust_remote_code), device)


def _load_gguf(source: ModelSource):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    os.environ.setdefault("TQDM_DISABLE", "1")  # the GGUF dequantiser's own bar; our progress is on stderr already
    folder, name = str(Path(source.path).parent), Path(source.path).name
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        model, info = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32, output_loading_info=True)
    except ImportError as e:
        raise UserError(f"loading .gguf files needs the gguf extra ({e}); pip install 'absorbdeploy[gguf]'") from None
    except (OSError, ValueError, KeyError, RuntimeError, NotImplementedError) as e:
        raise UserError(f"transformers could not read the GGUF file {source.name}: {_first_line(e)}") from None
    missing = set(info.get("missing_keys") or []) - set(tied_aliases(model))
    if missing:
        raise UserError(f"{source.name}: the GGUF file lacks {len(missing)} tensors the model needs (e.g. {sorted(missing)[0]})")
    # GGUF tensors are dequantised to dense fp32 at load, but the model stays flagged as quantised and
    # save_pretrained refuses it; it is an ordinary dense model from here on.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.name_or_path = source.name
    return model, tokenizer


def _load_directory(source: ModelSource, trust_remote_code: bool):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(source.path, trust_remote_code=trust_remote_code)
        config = source_config(source, trust_remote_code)
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(config, dtype=torch.float32, trust_remote_code=trust_remote_code)
        index = check_matches_disk(skeleton, source)
        if source.layout is None:
            model = AutoModelForCausalLM.from_pretrained(source.path, dtype=torch.float32, use_safetensors=True,
                                                         trust_remote_code=trust_remote_code)
        else:
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, trust_remote_code=trust_remote_code)
            state = index.read([n for n in model.state_dict() if n in index])
            model.load_state_dict({k: v.float() for k, v in state.items()}, strict=False)
            model.tie_weights()
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise UserError(f"transformers could not load {source.name}: {_first_line(e)}") from None
    return model, tokenizer


def source_config(source: ModelSource, trust_remote_code: bool = False):
    """The model's transformers config; for a checkpoint whose quantization_config we read ourselves (a bitmask layout
    our codec decodes, or dense weights under a sparsity-only compressed-tensors config), its base architecture's
    config without the quantization_config."""
    from transformers import AutoConfig

    if source.layout is None:
        return AutoConfig.from_pretrained(source.path, trust_remote_code=trust_remote_code)
    values = json.loads((Path(source.path) / "config.json").read_text())
    values.pop("quantization_config")
    values["model_type"] = source.model_type
    return AutoConfig.for_model(**values)


def _first_line(error: Exception) -> str:
    return str(error).strip().splitlines()[0] if str(error).strip() else error.__class__.__name__


def tied_aliases(model) -> dict[str, str]:
    """{alias: tensor it shares} when the config ties them (lm_head.weight -> model.embed_tokens.weight), else {}."""
    if not getattr(model.config, "tie_word_embeddings", False):
        return {}
    keys = getattr(model, "_tied_weights_keys", None) or {}
    return dict(keys) if isinstance(keys, dict) else {k: "model.embed_tokens.weight" for k in keys}


def check_matches_disk(model, source: ModelSource) -> "checkpoint.ShardIndex":
    """Every tensor the config implies comes from the files, with its shape, and nothing on disk goes unused; a tied
    pair stored twice must hold the same values. transformers would fill a missing weight randomly (or silently untie)
    instead. Works on a meta-device skeleton too. Returns the checkpoint's ShardIndex."""
    folder = Path(source.path)
    headers = source.headers if source.headers is not None else checkpoint.check_index(folder)
    table = checkpoint.tensor_table(headers)
    expected = {n: tuple(t.shape) for n, t in model.state_dict().items()}
    tied = tied_aliases(model)
    ignorable = tuple(getattr(model, "_keys_to_ignore_on_load_unexpected", None) or ())
    problems = checkpoint.consistency_problems(expected, {n: s for n, (_, s) in table.items()}, tied, ignorable)
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise UserError(f"{source.name}: the checkpoint does not match its config.json: {problems[0]}{more}")
    index = checkpoint.ShardIndex(folder, source.layout, headers)
    for alias, target in tied.items():
        if alias in table and target in table:
            pair = index.read([alias, target])
            if not pair[alias].equal(pair[target]):
                raise UserError(f"{source.name}: config.json ties {alias} to {target} (tie_word_embeddings: true) but the "
                                f"checkpoint stores a different {alias}; set tie_word_embeddings to false or drop {alias}")
    return index


def check_weights(named_tensors, export_dtype: str) -> None:
    """Refuse NaN/Inf in the source, and values the export dtype cannot represent (they would become inf)."""
    import torch

    limit = torch.finfo(getattr(torch, export_dtype)).max
    for name, tensor in named_tensors:
        if not tensor.is_floating_point() or tensor.is_meta:
            continue
        bad = ~torch.isfinite(tensor)
        if bad.any():
            nans = int(torch.isnan(tensor).sum())
            raise UserError(f"source weight {name} holds {nans} NaN and {int(bad.sum()) - nans} infinite values; "
                            "absorbdeploy refuses non-finite weights (the model is damaged)")
        peak = float(tensor.abs().max()) if tensor.numel() else 0.0
        if peak > limit:
            raise UserError(f"source weight {name} holds |w| up to {peak:.4g}, beyond {export_dtype}'s range ({limit:.4g}); "
                            "exporting would turn it into inf: set export.dtype to bfloat16 or float32")


def round_to_export(tensor, export_dtype: str, into=None):
    """`tensor` holding the values it will have on disk in `export_dtype` (float32: unchanged), as dtype `into`
    (default: its own dtype). The one place weights are rounded to the export dtype, loaded whole or streamed."""
    import torch

    into = into or tensor.dtype
    return (tensor if export_dtype == "float32" else tensor.to(getattr(torch, export_dtype))).to(into)


def round_weights(model, dtype_name: str) -> dict:
    """Give every weight the value it will have on disk, keeping fp32 compute: all artefacts then hold the same numbers.
    Returns {changed, weights, max_abs_change}: how much the rounding moved the values."""
    changed = total = 0
    peak = 0.0
    if dtype_name != "float32":
        for p in model.parameters():
            if p.is_meta:  # streaming: blocks not in memory are rounded when they are read
                continue
            rounded = round_to_export(p.data, dtype_name)
            moved = rounded != p.data
            changed, total = changed + int(moved.sum()), total + p.numel()
            if moved.any():
                peak = max(peak, float((rounded - p.data).abs().max()))
            p.data.copy_(rounded)
    return {"changed": changed, "weights": total, "max_abs_change": peak}
