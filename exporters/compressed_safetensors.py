"""Format `compressed-safetensors`: the legacy compressed-tensors (<= 0.14) bitmask layout, written and read by our codec.

Why our own codec: compressed-tensors >= 0.15 removed its sparse compressors, 0.14 needs transformers < 5, and
transformers 5.2x "loads" such checkpoints with random Linear weights and no error (export §0). No runtime in reach
reads this format today: it is the archive / transfer-size format, and `load` decodes it back to a dense model itself.

Per pruned Linear `<m>` (export §2.2), `<m>.weight` is replaced by
  sparse-bitmask     <m>.shape int64 [2] | <m>.compressed [nnz] | <m>.bitmask uint8 [out, ceil(in/8)] | <m>.row_offsets int64 [out]
  sparse-24-bitmask  <m>.shape int64 [2,1] | <m>.compressed [out, in/2] | <m>.bitmask uint8 [out, in/8]
bits packed little-endian along the input dimension (numpy.packbits(bitorder="little")). Everything else stays dense.
2:4 is written only after every tensor passes a 2:4 check: the legacy compressor keeps the top-2 |w| of every group of 4
whatever the tensor holds, so compressing a non-2:4 tensor would silently re-prune it.
"""

import json
import time
from pathlib import Path

from absorbdeploy.errors import UserError
from absorbdeploy.export_files import base_config, decoded_shards, describe_export, list_files, write_packed, write_sidecar
from absorbdeploy.exporters import Artifact, ExportSpec, Runtime, RuntimeOptions, open_in
from absorbdeploy.sparse.codec import LAYOUTS

FORMAT = "compressed-safetensors"
RUNTIMES = {"torch (decoded)": Runtime("torch", (), lambda out_dir, runtime: _open_decoded(out_dir))}
STREAM_BY_TENSORS = True  # decoding holds the whole model: in streaming mode its tensors are compared with vllm/
SERVES_CHECKPOINT = False
TIMED = False  # it decodes to exactly the in-memory model, which is timed in torch already
CHOOSES_DTYPE = False  # not timed
LAYOUT_VERSION = "0.14.0"  # the compressed-tensors release whose on-disk layout this reproduces


def export(model, tokenizer, out_dir, spec: ExportSpec) -> Artifact:
    start = time.perf_counter()
    out = Path(out_dir)
    layout = "sparse-24-bitmask" if spec.nm == (2, 4) else "sparse-bitmask"
    config = base_config(model, spec.dtype)
    config["quantization_config"] = {
        "quant_method": "compressed-tensors",
        "sparsity_config": {"format": layout, "global_sparsity": spec.sidecar.get("allocation", {}).get("realised", 0.0),
                            "ignore": ["lm_head"], "registry_requires_subclass": False,
                            "sparsity_structure": "2:4" if layout == "sparse-24-bitmask" else "unstructured",
                            "targets": ["Linear"]},
        "transform_config": {},
        "version": LAYOUT_VERSION,
    }
    write_packed(model, tokenizer, out, spec, layout, config)
    write_sidecar(out, spec, FORMAT)
    return Artifact(FORMAT, str(out), list_files(out), time.perf_counter() - start, [f"layout {layout} (compressed-tensors {LAYOUT_VERSION})"])


def tensors(out_dir):
    """Every stored tensor, compressed modules decoded to dense, one shard at a time (a module never straddles shards)."""
    yield from decoded_shards(out_dir, _layout(out_dir))


def _layout(out_dir) -> str:
    config = json.loads((Path(out_dir) / "config.json").read_text())
    layout = config.get("quantization_config", {}).get("sparsity_config", {}).get("format")
    if layout not in LAYOUTS:
        raise UserError(f"{out_dir}/config.json has no sparse-bitmask sparsity_config; not a {FORMAT} export")
    return layout


def describe(out_dir) -> dict:
    return describe_export(out_dir, tensors(out_dir), layout=_layout(out_dir))


def load(out_dir, runtime: RuntimeOptions):
    return open_in(RUNTIMES, out_dir, runtime)


def _open_decoded(out_dir):
    """Decode the checkpoint into a transformers model (the loader that accepts bitmask checkpoints as input)."""
    import torch

    from absorbdeploy.load import load as load_model
    from absorbdeploy.runners import TorchRunner
    from absorbdeploy.source import resolve_source

    return TorchRunner(load_model(resolve_source(str(out_dir)), torch.device("cpu")).model, name="torch (decoded)")
