"""Format `bitmask`: the served-sparse artefact. Pruned Linears hold only their non-zeros and a bitmask, and run on
absorbdeploy's CPU kernel when loaded the standard way. The values are the export dtype's (bf16/fp16), or int8 with
one fp32 scale per output channel (`export.values: int8`; codec.quantize_values, W8A16 in the kernel), optionally with
the Linears' inputs quantized per token at run time (`export.activations: int8`: W8A8, integer sums in the kernel).

On disk: the sparse-bitmask layout of sparse/codec.py (`<m>.compressed`, `<m>.bitmask`, `<m>.row_offsets`, `<m>.shape` per
pruned Linear; everything else dense) in `bitmask-XXXXX-of-YYYYY.safetensors` shards named by
`bitmask.safetensors.index.json` (never `model.safetensors`). config.json: model_type `absorbdeploy_<base>` and a
quantization_config with quant_method `absorbdeploy-bitmask` listing the packed Linears (`targets`), so that
`import absorbdeploy; AutoModelForCausalLM.from_pretrained(DIR)` builds BitmaskLinear modules (sparse/hf.py) and
every loader without our plugin refuses the directory rather than load random weights. vLLM serves it through
the absorbdeploy plugin. The runner here is that transformers model; its dense baseline is the same model from a
plain checkpoint in the same runtime and dtype.
"""

import json
import time
from pathlib import Path

from absorbdeploy.export_files import base_config, decoded_shards, describe_export, list_files, write_packed, write_sidecar
from absorbdeploy.exporters import Artifact, ExportSpec, Runtime, RuntimeOptions, open_in
from absorbdeploy.sparse.codec import INT8_PER_TOKEN, QUANTIZED_VALUES, WEIGHTS_STEM, FormatConfig, model_type_for

FORMAT = "bitmask"
RUNTIMES = {"torch + bitmask kernel": Runtime("torch", (), lambda out_dir, runtime: _open_torch(out_dir, runtime)),
            "vllm + bitmask plugin": Runtime("vllm", ("vllm",), lambda out_dir, runtime: _open_vllm(out_dir, runtime))}
STREAM_BY_TENSORS = True  # streaming: the model may not fit in this process; its tensors are compared instead
SERVES_CHECKPOINT = True  # transformers loads a plain checkpoint too: the dense baseline in the same runtime
TIMED = True
CHOOSES_DTYPE = True  # transformers and vLLM compute in the dtype asked for
LAYOUT = "sparse-bitmask"


def export(model, tokenizer, out_dir, spec: ExportSpec) -> Artifact:
    start = time.perf_counter()
    out = Path(out_dir)
    config = base_config(model, spec.dtype)
    config["model_type"] = model_type_for(config["model_type"])
    targets = tuple(n[: -len(".weight")] for n in spec.prunable)
    values = values_dtype(spec)
    config["quantization_config"] = FormatConfig(targets, LAYOUT, values,
                                                 input_activations=quantized_activations(spec)).to_dict()
    write_packed(model, tokenizer, out, spec, LAYOUT, config, stem=WEIGHTS_STEM, always_index=True, values=values)
    write_sidecar(out, spec, FORMAT)
    notes = ["load with `import absorbdeploy` + AutoModelForCausalLM.from_pretrained, or serve with vLLM + the plugin"]
    return Artifact(FORMAT, str(out), list_files(out), time.perf_counter() - start, notes)


VALUES = {"auto": None, "bf16": "bfloat16", "fp16": "float16", "int8": "int8"}  # export.values -> values dtype


def values_dtype(spec: ExportSpec) -> str:
    """The packed values' dtype: export.values, or the export dtype for auto."""
    return VALUES[spec.values] or spec.dtype


def quantized_values(spec: ExportSpec) -> str | None:
    """"int8" when the packed values are quantized (validation compares them with the int8-dequantized pruned model),
    else None."""
    values = values_dtype(spec)
    return values if values in QUANTIZED_VALUES else None


def quantized_activations(spec: ExportSpec) -> str | None:
    """codec.INT8_PER_TOKEN when the packed Linears quantize their inputs (export.activations: int8, W8A8), else None."""
    return INT8_PER_TOKEN if spec.activations == "int8" else None


def tensors(out_dir):
    yield from decoded_shards(out_dir, LAYOUT)


def describe(out_dir) -> dict:
    """describe_export's summary plus the packed values' dtype and the packed Linears' bytes on disk per weight (values,
    bitmask, row offsets, shape and scales over the weights they hold: 2 for dense bf16)."""
    from absorbdeploy.checkpoint import check_index

    config = json.loads((Path(out_dir) / "config.json").read_text())
    described = describe_export(out_dir, tensors(out_dir), model_type=config.get("model_type"))
    targets = set(config["quantization_config"]["targets"])
    packed = sum(info["data_offsets"][1] - info["data_offsets"][0] for header in check_index(Path(out_dir)).values()
                 for key, info in header.items() if key != "__metadata__" and key.rpartition(".")[0] in targets)
    weights = described["audit"]["weights"]
    quantization = config["quantization_config"]
    return {**described, "values": quantization["values_dtype"],
            **({"activations": quantization["input_activations"]} if "input_activations" in quantization else {}),
            "linear_bytes_per_weight": packed / weights if weights else None}


def load(out_dir, runtime: RuntimeOptions):
    """transformers' from_pretrained after absorbdeploy's registration: BitmaskLinear modules on our kernel; or, for
    the vLLM runtime, vllm.LLM with the absorbdeploy plugin. A plain checkpoint loads in either as itself, dense: the
    baseline."""
    return open_in(RUNTIMES, out_dir, runtime)


def _open_torch(out_dir, runtime: RuntimeOptions):
    import torch
    from transformers import AutoModelForCausalLM

    from absorbdeploy.runners import TorchRunner
    from absorbdeploy.sparse.hf import register

    register()
    model = AutoModelForCausalLM.from_pretrained(str(out_dir), dtype=getattr(torch, runtime.dtype), use_safetensors=True)
    return TorchRunner(model.eval(), name="torch + bitmask kernel")


def _open_vllm(out_dir, runtime: RuntimeOptions):
    from absorbdeploy.sparse.directory import check_directory
    from absorbdeploy.vllm_runner import VllmRunner

    check_directory(out_dir)  # vLLM's engine process would report a damaged file only as a failed engine core

    return VllmRunner(out_dir, runtime.dtype, runtime.max_model_len, name="vllm + bitmask plugin",
                      kv_cache_gib=runtime.kv_cache_gib)
