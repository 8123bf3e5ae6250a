"""Format `vllm`: a complete `save_pretrained` directory that vLLM serves, plus the sidecar `absorbdeploy.json`.

The pruned zeros are stored densely and config.json carries **no** `sparsity_config`: vLLM >= 0.24 refuses any checkpoint
whose compressed-tensors sparsity config has targets (export §4.2), and no vLLM kernel runs unstructured sparsity faster
anyway. The sparsity facts (allocation, realised sparsity per tensor, provenance) live in the sidecar.

Its runtime is vllm_runner.VllmRunner: `vllm.LLM` in a worker subprocess, scored by prompt log-probs (vLLM exposes
log-probs, not logits, so the comparison with the in-memory model uses the log-prob of each next token).
"""

import json
import time
from pathlib import Path

from absorbdeploy.export_files import describe_export, list_files, write_checkpoint, write_sidecar
from absorbdeploy.exporters import Artifact, ExportSpec, Runtime, RuntimeOptions, open_in

FORMAT = "vllm"
RUNTIMES = {"vllm": Runtime("vllm", ("vllm",), lambda out_dir, runtime: _open_vllm(out_dir, runtime))}
STREAM_BY_TENSORS = False
SERVES_CHECKPOINT = True
TIMED = True
CHOOSES_DTYPE = True  # vLLM computes in the dtype asked for


def export(model, tokenizer, out_dir, spec: ExportSpec) -> Artifact:
    start = time.perf_counter()
    out = Path(out_dir)
    write_checkpoint(model, tokenizer, out, spec)
    assert "sparsity_config" not in (out / "config.json").read_text(), "vLLM refuses sparsity metadata (sidecar only)"
    write_sidecar(out, spec, FORMAT)
    return Artifact(FORMAT, str(out), list_files(out), time.perf_counter() - start)


def tensors(out_dir):
    from safetensors.torch import load_file

    for file in sorted(Path(out_dir).glob("*.safetensors")):
        yield load_file(str(file))


def describe(out_dir) -> dict:
    config = json.loads((Path(out_dir) / "config.json").read_text())
    return describe_export(out_dir, tensors(out_dir), sparsity_config_in_config_json="sparsity_config" in json.dumps(config))


def load(out_dir, runtime: RuntimeOptions):
    return open_in(RUNTIMES, out_dir, runtime)


def _open_vllm(out_dir, runtime: RuntimeOptions):
    from absorbdeploy.vllm_runner import VllmRunner

    return VllmRunner(out_dir, runtime.dtype, runtime.max_model_len, kv_cache_gib=runtime.kv_cache_gib)
