"""Format `bitmask`: the served-sparse artefact. Pruned Linears hold only their non-zeros and a bitmask, and run on
absorbdeploy's CPU kernel when loaded the standard way.

On disk: the sparse-bitmask layout of bitmask.py (`<m>.compressed`, `<m>.bitmask`, `<m>.row_offsets`, `<m>.shape` per
pruned Linear; everything else dense), 2:4 included. config.json: model_type `absorbdeploy_<base>` and a
quantization_config with quant_method `absorbdeploy-bitmask` listing the packed Linears (`targets`), so that
`import absorbdeploy; AutoModelForCausalLM.from_pretrained(DIR)` builds BitmaskLinear modules (hf_bitmask.py) and
plain transformers or compressed-tensors refuse the directory rather than load random weights. vLLM serves it through
the absorbdeploy plugin. The runner here is that transformers model; its dense baseline is the same model from a
plain checkpoint in the same runtime and dtype.
"""

import json
import time
from pathlib import Path

from absorbdeploy import exporters
from absorbdeploy.checkpoint import MODEL_TYPE_PREFIX, SERVED_SPARSE_METHOD
from absorbdeploy.exporters import Artifact, ExportSpec, RuntimeOptions, list_files, write_sidecar

FORMAT = "bitmask"
RUNTIMES = {"torch + bitmask kernel": ("torch", ()), "vllm + bitmask plugin": ("vllm", ("vllm",))}
STREAM_BY_TENSORS = True  # streaming: the model may not fit in this process; its tensors are compared instead
SERVES_CHECKPOINT = True  # transformers loads a plain checkpoint too: the dense baseline in the same runtime
TIMED = True
LAYOUT = "sparse-bitmask"


def export(model, tokenizer, out_dir, spec: ExportSpec) -> Artifact:
    start = time.perf_counter()
    out = Path(out_dir)
    config = exporters.base_config(model, spec.dtype)
    config["model_type"] = MODEL_TYPE_PREFIX + config["model_type"]
    config["quantization_config"] = {"quant_method": SERVED_SPARSE_METHOD, "format": LAYOUT, "values_dtype": spec.dtype,
                                     "targets": [n[: -len(".weight")] for n in spec.prunable], "version": 1}
    exporters.write_packed(model, tokenizer, out, spec, LAYOUT, config)
    write_sidecar(out, spec, FORMAT)
    notes = ["load with `import absorbdeploy` + AutoModelForCausalLM.from_pretrained, or serve with vLLM + the plugin"]
    return Artifact(FORMAT, str(out), list_files(out), time.perf_counter() - start, notes)


def tensors(out_dir):
    yield from exporters.decoded_shards(out_dir, LAYOUT)


def describe(out_dir) -> dict:
    config = json.loads((Path(out_dir) / "config.json").read_text())
    return exporters.describe(out_dir, tensors(out_dir), model_type=config.get("model_type"))


def load(out_dir, runtime: RuntimeOptions):
    """transformers' from_pretrained after absorbdeploy's registration: BitmaskLinear modules on our kernel; or, for
    the vLLM runtime, vllm.LLM with the absorbdeploy plugin (exporters/vllm.py's runner). A plain checkpoint loads in
    either as itself, dense: the baseline."""
    import torch
    from transformers import AutoModelForCausalLM

    from absorbdeploy.hf_bitmask import register
    from absorbdeploy.runners import TorchRunner

    if runtime.name == "vllm + bitmask plugin":
        from absorbdeploy.exporters.vllm import VllmRunner

        return VllmRunner(out_dir, runtime.dtype, runtime.max_model_len, name=runtime.name)
    register()
    model = AutoModelForCausalLM.from_pretrained(str(out_dir), dtype=getattr(torch, runtime.dtype), use_safetensors=True)
    return TorchRunner(model.eval(), name="torch + bitmask kernel")
