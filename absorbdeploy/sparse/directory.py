"""A `bitmask/` directory proven consistent as a whole before a runtime that cannot report a bad file cleanly gets it:
`absorbdeploy serve` and the vLLM runtime of validation run `check_directory` first, because inside vLLM's engine
process a PackedFormatError surfaces only as "Engine core initialization failed". The transformers door needs no
such step (its quantizer runs the same checks in this process, sparse/hf.py).

The rules are integrity.py's, applied to what the directory holds: the quantization_config read by
codec.FormatConfig (allow-listed layout, values dtype, version, targets), every target and packed tensor matched,
every packed matrix's dtypes, shapes, bits and row offsets (tensors memory-mapped, one module at a time), and its
shape equal to the Linear the architecture builds (the model instantiated on the meta device, no memory).
"""

import json
from pathlib import Path

from absorbdeploy.checkpoint import check_index
from absorbdeploy.sparse import integrity
from absorbdeploy.sparse.codec import SERVED_SPARSE_METHOD, FormatConfig, PackedFormatError


def served_sparse_config(folder: Path) -> FormatConfig | None:
    """The FormatConfig of a `bitmask/` export's config.json, or None for any other checkpoint or directory (no
    config.json: an ONNX export). Raises PackedFormatError for a config.json that is not JSON or a quantization_config
    the format refuses."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        return None
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise PackedFormatError(f"{folder}/config.json cannot be read as JSON: {e}") from None
    quantization = config.get("quantization_config") if isinstance(config, dict) else None
    if not isinstance(quantization, dict) or quantization.get("quant_method") != SERVED_SPARSE_METHOD:
        return None
    return FormatConfig.from_dict(quantization)


def check_directory(folder) -> int:
    """Every packed matrix of a `bitmask/` export checked (integrity.check_targets, then check_packed per target);
    returns how many were, 0 for a directory that is not a `bitmask/` export. Raises PackedFormatError naming the
    module and the mismatch (UserError for a shard whose header is corrupt, checkpoint.check_index)."""
    from contextlib import ExitStack

    from safetensors import safe_open

    folder = Path(folder)
    described = served_sparse_config(folder)
    if described is None:
        return 0
    owner = {key: file for file, header in check_index(folder).items() for key in header if key != "__metadata__"}
    integrity.check_targets(described.targets, owner, described.values_dtype)
    sizes = linear_sizes(folder, described.targets)
    with ExitStack() as stack:
        shards = {file: stack.enter_context(safe_open(str(file), "pt")) for file in set(owner.values())}
        for module in described.targets:
            parts = {part: shards[owner[f"{module}.{part}"]].get_tensor(f"{module}.{part}") for part in described.parts}
            integrity.check_packed(module, parts, described.values_dtype, *sizes[module])
    return len(described.targets)


def linear_sizes(folder: Path, targets) -> dict[str, tuple[int, int]]:
    """{target: (out_features, in_features)} of the model config.json describes, built on the meta device.
    Raises PackedFormatError for a target that is not a Linear of that model (hf.target_linear)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from absorbdeploy.sparse.hf import target_linear  # importing hf registers the absorbdeploy_<base> model types

    config = AutoConfig.from_pretrained(str(folder))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    sizes = {}
    for name in targets:
        linear = target_linear(model, name)
        sizes[name] = (linear.out_features, linear.in_features)
    return sizes
