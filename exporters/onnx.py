"""Format `onnx`: a logits graph (`torch.onnx.export(dynamo=True)`, dynamic batch and sequence, no KV cache) whose pruned
weights are stored as sparse tensors wherever that makes the file smaller.

Storage (export §5): a pruned weight becomes a `Constant` node with a `sparse_value` (values + 1-D int64 indices) rather
than a graph `sparse_initializer`: both store the same bytes, but the Constant's output is dense, so strict shape
inference and `onnx.checker.check_model(full_check=True)` pass. With int64 indices, sparse is smaller only above 66.7 %
sparsity in fp32 (80 % in fp16); `sparse: auto` decides per tensor. onnx's external-data writer ignores sparse tensors,
so they stay inside the .onnx protobuf, which must stay under 2 GiB; dense weights go to `model.onnx.data` when the
model is large. onnxruntime densifies sparse tensors when it creates the session (export §5.4): disk size drops, memory
and latency do not. The runner is an onnxruntime session (CUDA EP when available).
"""

import time
from pathlib import Path

from absorbdeploy.errors import UserError
from absorbdeploy.export_files import describe_export, list_files, read_sidecar, write_sidecar
from absorbdeploy.exporters import Artifact, ExportSpec, Runtime, RuntimeOptions, open_in
from absorbdeploy.runners import Runner, Timing

FORMAT = "onnx"
RUNTIMES = {"onnxruntime": Runtime("onnxruntime", ("onnxruntime",), lambda out_dir, runtime: OnnxRunner(out_dir))}
STREAM_BY_TENSORS = False  # exporting traced the whole model anyway; onnxruntime runs it
SERVES_CHECKPOINT = False
TIMED = True
CHOOSES_DTYPE = False  # the graph's dtype is fixed at export
MODEL_FILE = "model.onnx"
KV_DIR = "kv"
DATA_FILE = "model.onnx.data"
PROTOBUF_LIMIT = 2**31 - 1  # protobuf cannot serialise a message this large: model.onnx must stay below it
EXTERNAL_DATA_ABOVE = 1 << 30  # dense bytes above which weights go to external data even when everything would fit
INDEX_BYTES = 8  # int64 linear index per non-zero


def inline_budget(proto, limit: int) -> int:
    """Bytes of tensor data model.onnx may hold inline: the limit less the graph itself (nodes carry the exporter's
    metadata, about 2 KB each) and a margin."""
    g = proto.graph
    graph = sum(x.ByteSize() for part in (g.node, g.value_info, g.input, g.output) for x in part)
    return limit - graph - min(64 << 20, limit // 16)


def sparse_is_smaller(numel: int, nnz: int, itemsize: int) -> bool:
    """The break-even of export §5.6: nnz (itemsize + 8) < numel itemsize."""
    return nnz * (itemsize + INDEX_BYTES) < numel * itemsize


def _logits_module(model):
    """model(input_ids) -> logits without a KV cache: the graph onnxruntime scores windows with."""
    import torch

    class Logits(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.model = inner

        def forward(self, input_ids):
            return self.model(input_ids=input_ids, use_cache=False).logits

    return Logits(model).eval()


def _to_graph(model, opset: int):
    import logging
    import warnings

    import torch

    sample = torch.zeros(2, 16, dtype=torch.long, device=next(model.parameters()).device)
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("sequence")
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)  # "torchvision is not installed" notices
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        program = torch.onnx.export(_logits_module(model), (sample,), dynamo=True, optimize=False, opset_version=opset,
                                    verbose=False, dynamic_shapes={"input_ids": {0: batch, 1: seq}},
                                    input_names=["input_ids"], output_names=["logits"])
    return program.model_proto


def _sparsify(proto, spec: ExportSpec, budget: int) -> tuple[dict, list[str], int]:
    """Swap pruned initializers for Constant(sparse_value) nodes where allowed and where the inline sparse data stays
    within the protobuf budget; returns {hf name: onnx name}, notes and the inline sparse bytes."""
    import numpy as np
    from onnx import helper, numpy_helper

    prunable = set(spec.prunable)
    names, notes, inline, sparse_count = {}, [], 0, 0
    keep, constants = [], []
    for init in proto.graph.initializer:
        hf = init.name[len("model."):] if init.name.startswith("model.") else init.name
        if hf not in prunable:
            keep.append(init)
            continue
        names[hf] = init.name
        array = numpy_helper.to_array(init)
        flat = array.reshape(-1)
        nz = np.flatnonzero(flat)
        smaller = sparse_is_smaller(flat.size, nz.size, flat.itemsize)
        wanted = spec.options.sparse == "always" or (spec.options.sparse == "auto" and smaller)
        size = nz.size * (flat.itemsize + INDEX_BYTES)
        if not wanted or inline + size > budget:
            if wanted:  # sparse tensors cannot go to external data: past the budget they are stored dense
                notes.append(f"{hf}: stored dense, inline sparse data would pass the protobuf limit")
            keep.append(init)
            continue
        values = numpy_helper.from_array(flat[nz], name=init.name)
        indices = numpy_helper.from_array(nz.astype(np.int64), name=init.name + "__indices")
        sparse = helper.make_sparse_tensor(values, indices, list(array.shape))
        constants.append(helper.make_node("Constant", [], [init.name], name=init.name + "__sparse", sparse_value=sparse))
        inline += size
        sparse_count += 1
    del proto.graph.initializer[:]
    proto.graph.initializer.extend(keep)
    nodes = list(proto.graph.node)
    del proto.graph.node[:]
    proto.graph.node.extend(constants + nodes)
    notes.insert(0, f"{sparse_count} of {len(names)} pruned weights stored sparse (policy {spec.options.sparse}); "
                    "onnxruntime densifies them at session creation")
    return names, notes, inline


def export(model, tokenizer, out_dir, spec: ExportSpec) -> Artifact:
    import onnx
    import torch

    start = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    source = model
    if spec.checkpoint is not None:  # streaming: ONNX tracing needs the whole model, read once from vllm/
        from transformers import AutoModelForCausalLM

        source = AutoModelForCausalLM.from_pretrained(spec.checkpoint, dtype=torch.float32).eval()
    first = next(source.parameters())
    if spec.dtype != "float32" or first.dtype != torch.float32 or first.device.type != "cpu":
        import copy  # onnxruntime runs the graph on its own device: trace a CPU copy in the ONNX dtype

        source = copy.deepcopy(source).to("cpu", getattr(torch, spec.dtype))
    proto = _to_graph(source, spec.options.opset)
    proto.ir_version = min(proto.ir_version, 10)  # onnxruntime >= 1.20 reads IR 10; newer onnx defaults are refused
    budget = inline_budget(proto, PROTOBUF_LIMIT)
    names, notes, inline = _sparsify(proto, spec, budget)
    dense_bytes = sum(t.ByteSize() for t in proto.graph.initializer)
    external = dense_bytes > EXTERNAL_DATA_ABOVE or dense_bytes + inline > budget
    onnx.save_model(proto, str(out / MODEL_FILE), save_as_external_data=external, all_tensors_to_one_file=True,
                    location=DATA_FILE, size_threshold=1024)
    if (out / MODEL_FILE).stat().st_size >= PROTOBUF_LIMIT:
        raise RuntimeError(f"{MODEL_FILE} passed the protobuf limit despite external data")  # a bug, never expected
    onnx.checker.check_model(str(out / MODEL_FILE))
    write_sidecar(out, spec, FORMAT, onnx_names=names)
    if external:
        notes.append(f"dense weights in external data {DATA_FILE}")
    if spec.options.kv_cache:
        notes.append(_export_kv_pair(source, out, spec.options.opset))
    del source
    return Artifact(FORMAT, str(out), list_files(out), time.perf_counter() - start, notes)


def _export_kv_pair(model, out: Path, opset: int) -> str:
    """prefill.onnx + decode.onnx with a KV cache (transformers' own exporter), for decode latency; dense weights."""
    import logging
    import warnings

    import torch
    from transformers.exporters.configs import OnnxConfig
    from transformers.exporters.exporter_onnx import OnnxExporter

    sample = torch.zeros(2, 16, dtype=torch.long, device=next(model.parameters()).device)  # batch >= 2 stays dynamic
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        programs = OnnxExporter().export_for_generation(
            model, {"input_ids": sample, "attention_mask": torch.ones_like(sample)}, OnnxConfig(dynamic=True, opset_version=opset))
    (out / KV_DIR).mkdir(exist_ok=True)
    for name, program in programs.items():
        program.save(str(out / KV_DIR / f"{name}.onnx"), external_data=True)
    return f"KV-cache pair {KV_DIR}/prefill.onnx + {KV_DIR}/decode.onnx (dense weights) for decode latency"


def read_weights(out_dir, wanted: dict) -> dict:
    """{hf name: torch tensor} for the given {hf name: onnx name}, from initializers or sparse Constants."""
    import numpy as np
    import onnx
    import torch
    from onnx import numpy_helper

    proto = onnx.load(str(Path(out_dir) / MODEL_FILE), load_external_data=True)
    dense = {i.name: i for i in proto.graph.initializer}
    sparse = {n.output[0]: n for n in proto.graph.node if n.op_type == "Constant" and n.attribute
              and n.attribute[0].name == "sparse_value"}
    found = {}
    for hf, name in wanted.items():
        if name in dense:
            found[hf] = torch.from_numpy(numpy_helper.to_array(dense[name]).copy())
        elif name in sparse:
            st = sparse[name].attribute[0].sparse_tensor
            values, indices = numpy_helper.to_array(st.values), numpy_helper.to_array(st.indices)
            array = np.zeros(int(np.prod(st.dims)), dtype=values.dtype)
            array[indices] = values
            found[hf] = torch.from_numpy(array.reshape(tuple(st.dims)))
        else:
            raise UserError(f"{out_dir}/{MODEL_FILE} lacks the weight {hf}; the export is incomplete")
    return found


def tensors(out_dir):
    """The pruned weights (the graph's other initializers keep the exporter's own names)."""
    yield read_weights(out_dir, read_sidecar(out_dir)["onnx_names"])


def describe(out_dir) -> dict:
    return describe_export(out_dir, tensors(out_dir))


def load(out_dir, runtime: RuntimeOptions) -> "OnnxRunner":
    return open_in(RUNTIMES, out_dir, runtime)


class OnnxRunner(Runner):
    runtime = "onnxruntime"

    def __init__(self, out_dir):
        import onnxruntime as ort

        providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in ort.get_available_providers()]
        options = ort.SessionOptions()
        options.log_severity_level = 3
        self.session = ort.InferenceSession(str(Path(out_dir) / MODEL_FILE), options, providers=providers)
        kv = Path(out_dir) / KV_DIR
        self.kv = None
        if (kv / "prefill.onnx").is_file() and (kv / "decode.onnx").is_file():
            self.kv = {n: ort.InferenceSession(str(kv / f"{n}.onnx"), options, providers=providers) for n in ("prefill", "decode")}

    def logits(self, ids):
        import torch

        return torch.from_numpy(self.session.run(["logits"], {"input_ids": ids.numpy()})[0]).float()

    def generate(self, prompt, new_tokens: int) -> Timing:
        import numpy as np

        ids = prompt.numpy()
        if self.kv is None:  # no KV-cache graph: only the prompt forward is timed
            start = time.perf_counter()
            self.session.run(["logits"], {"input_ids": ids})
            return Timing(time.perf_counter() - start, None, new_tokens)
        prefill, decode = self.kv["prefill"], self.kv["decode"]
        start = time.perf_counter()
        outputs = dict(zip([o.name for o in prefill.get_outputs()], prefill.run(None, {
            "input_ids": ids, "position_ids": np.arange(ids.shape[1], dtype=np.int64)[None]})))
        prefill_s = time.perf_counter() - start
        names = [o.name for o in decode.get_outputs()]
        tokens = [outputs["logits"][:, -1:].argmax(-1).astype(np.int64)]
        start = time.perf_counter()
        for step in range(new_tokens - 1):
            token = tokens[-1]
            feeds = {"input_ids": token, "position_ids": np.array([[ids.shape[1] + step]], dtype=np.int64)}
            feeds.update({k.replace("output.", "input.", 1): v for k, v in outputs.items() if k.startswith("output.")})
            outputs = dict(zip(names, decode.run(None, feeds)))
            tokens.append(outputs["logits"][:, -1:].argmax(-1).astype(np.int64))
        return Timing(prefill_s, time.perf_counter() - start, new_tokens, [int(t[0, 0]) for t in tokens])
