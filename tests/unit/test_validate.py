"""Validation's own logic, without starting a runtime: which (format, runtime) pairs are scored, the dense baseline each
runtime is timed against, the tensor-by-tensor comparison of streaming mode, the dense byte count and how a failed
reload is reported. The whole stage runs in tests/tiny/test_pipeline.py and tests/tiny/test_cli.py."""

import types

import pytest
import torch

from absorbdeploy import exporters, validate
from absorbdeploy.export_files import ShardWriter
from absorbdeploy.exporters import ExportSpec, Runtime
from absorbdeploy.recipe import Latency, Validate
from absorbdeploy.tiny import TINY_CONFIG


def test_entries_name_every_installed_runtime_of_every_format(monkeypatch):
    fake = types.SimpleNamespace(RUNTIMES={
        "own": Runtime("torch", (), None),
        "second": Runtime("onnxruntime", ("json",), None),
        "absent": Runtime("vllm", ("no_such_module_for_absorbdeploy",), None),
    })
    monkeypatch.setattr(exporters, "get", lambda name: fake)
    assert validate.entries({"x": None, "y": None}) == {"x": ("x", "own"), "x (second)": ("x", "second"),
                                                        "y": ("y", "own"), "y (second)": ("y", "second")}


def test_runtimes_hold_the_longest_sequence_validation_asks_for():
    assert validate._max_len(Validate(seqlen=128, latency=Latency(prompt_len=32, new_tokens=8))) == 136
    assert validate._max_len(Validate(seqlen=16, latency=Latency(prompt_len=100, new_tokens=30))) == 138


def _checkpoint(folder, tensors):
    writer = ShardWriter(folder, max_shard_bytes=64)
    for name, t in tensors.items():
        writer.add({name: t})
    writer.finish()
    return folder


TENSORS = {"a": torch.arange(12.0), "b": torch.ones(3, 4), "c": torch.zeros(20)}


def test_tensors_match_needs_every_tensor_bit_identical_and_none_missing(tmp_path):
    folder = _checkpoint(tmp_path, TENSORS)
    assert validate.tensors_match([{"a": TENSORS["a"], "b": TENSORS["b"]}, {"c": TENSORS["c"]}], folder)
    changed = TENSORS["a"].clone()
    changed[5] += 1e-6
    assert not validate.tensors_match([{"a": changed, "b": TENSORS["b"], "c": TENSORS["c"]}], folder)
    assert not validate.tensors_match([{"a": TENSORS["a"], "b": TENSORS["b"]}], folder)  # c never compared


def test_with_int8_values_the_pruned_tensors_are_compared_as_int8_stores_them(tmp_path):
    from absorbdeploy.sparse.codec import quantize_values

    weight = torch.randn(6, 16) * (torch.rand(6, 16) < 0.5)
    folder = _checkpoint(tmp_path, {"w": weight, "b": TENSORS["b"]})
    q, scales = quantize_values(weight)
    stored = {"w": q.float() * scales.unsqueeze(1), "b": TENSORS["b"]}
    assert validate.tensors_match([stored], folder, ("int8", ["w"]))
    assert not validate.tensors_match([stored], folder)  # as bf16 values it would be wrong
    assert not validate.tensors_match([{"w": weight, "b": TENSORS["b"]}], folder, ("int8", ["w"]))


def _tiny_parameters() -> int:
    """Weights of the tiny Llama counted from its configuration (the tied lm_head once)."""
    c = TINY_CONFIG
    head_dim = c["hidden_size"] // c["num_attention_heads"]
    kv = c["num_key_value_heads"] * head_dim
    attention = 2 * c["hidden_size"] ** 2 + 2 * c["hidden_size"] * kv
    mlp = 3 * c["hidden_size"] * c["intermediate_size"]
    block = attention + mlp + 2 * c["hidden_size"]
    return c["vocab_size"] * c["hidden_size"] + c["num_hidden_layers"] * block + c["hidden_size"]


@pytest.mark.parametrize("dtype, itemsize", [("float32", 4), ("bfloat16", 2), ("float16", 2)])
def test_dense_weight_bytes_count_tied_weights_once_also_on_meta(tiny, dtype, itemsize):
    from transformers import LlamaConfig, LlamaForCausalLM

    model, _ = tiny
    assert validate.dense_weight_bytes(model, dtype) == _tiny_parameters() * itemsize
    with torch.device("meta"):
        skeleton = LlamaForCausalLM(LlamaConfig(**TINY_CONFIG))
    assert validate.dense_weight_bytes(skeleton, dtype) == _tiny_parameters() * itemsize


def test_a_failure_is_a_one_line_result_naming_the_error():
    assert validate._failure("vllm", RuntimeError("engine died\nlong traceback")) == \
           {"runtime": "vllm", "error": "RuntimeError: engine died"}
    assert validate._failure("onnxruntime", KeyError()) == {"runtime": "onnxruntime", "error": "KeyError: "}


class _Format:
    def __init__(self, serves_checkpoint):
        self.SERVES_CHECKPOINT, self.specs = serves_checkpoint, []

    def export(self, model, tokenizer, out, spec):
        self.specs.append(spec)
        return exporters.Artifact("fake", str(out), {"model.onnx": 123}, 0.0)


def test_the_dense_baseline_is_a_checkpoint_where_the_runtime_serves_one(tiny, tmp_path):
    model, tokenizer = tiny
    spec = ExportSpec(dtype="bfloat16", prunable=(), sidecar={"run": 1}, streamed=object(), checkpoint="x")
    subjects = validate.Subjects(None, None, 258, dense_model=model)
    path, size = validate._dense_baseline(_Format(True), subjects, tokenizer, spec, tmp_path / "vllm")
    assert path == str(tmp_path / "vllm") and (tmp_path / "vllm" / "config.json").is_file()
    assert size == sum(p.stat().st_size for p in (tmp_path / "vllm").rglob("*") if p.is_file())

    own = _Format(False)  # a format that serves no checkpoint exports the dense model in itself
    assert validate._dense_baseline(own, subjects, tokenizer, spec, tmp_path / "onnx") == (str(tmp_path / "onnx"), 123)
    assert own.specs[0].sidecar == {"baseline": "dense"} and own.specs[0].streamed is None and own.specs[0].checkpoint is None
    assert own.specs[0].dtype == "bfloat16"


def test_streaming_times_against_the_source_checkpoint_or_nothing(tmp_path):
    _checkpoint(tmp_path / "source", TENSORS)
    streamed = validate.Subjects(None, None, 258, dense_checkpoint=tmp_path / "source")
    spec = ExportSpec(dtype="bfloat16", prunable=())
    path, size = validate._dense_baseline(_Format(True), streamed, None, spec, tmp_path / "unused")
    assert path == str(tmp_path / "source") and size == sum(p.stat().st_size for p in (tmp_path / "source").iterdir())
    assert validate._dense_baseline(_Format(False), streamed, None, spec, tmp_path / "unused") is None
    assert not (tmp_path / "unused").exists()
