"""Resolving MODEL without loading it: the builtin model, a checkpoint directory (type, context, stored dtype), the
files a run reads and their digest, and one-line refusals for everything that is not a supported safetensors causal LM."""

import hashlib
import json

import pytest

from absorbdeploy import source
from absorbdeploy.errors import UserError
from tests.helpers import tiny_checkpoint


@pytest.fixture(scope="module")
def checkpoint_dir(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("source") / "tiny")


def test_the_builtin_model_needs_no_files():
    found = source.resolve_source("builtin:tiny-llama")
    assert (found.kind, found.path, found.model_type, found.context) == ("builtin", "builtin:tiny-llama", "llama", 1024)
    assert source.input_paths(found) == [] and source.weights_sha256(found) is None


def test_a_directory_states_its_type_context_and_dtype(checkpoint_dir):
    found = source.resolve_source(str(checkpoint_dir))
    assert (found.kind, found.name, found.model_type, found.context) == ("dir", str(checkpoint_dir), "llama", 1024)
    assert found.dtype == "float32" and found.layout is None
    weights = checkpoint_dir / "model.safetensors"
    assert source.input_paths(found) == [checkpoint_dir, weights]
    assert source.weights_sha256(found) == hashlib.sha256(weights.read_bytes()).hexdigest()


def test_a_16_bit_checkpoint_reports_its_dtype(tmp_path):
    found = source.resolve_source(str(tiny_checkpoint(tmp_path / "half", dtype="float16", architecture="qwen2")))
    assert (found.dtype, found.model_type) == ("float16", "qwen2")


def _copy_without(checkpoint_dir, folder, config=None, weights=True, extra=()):
    folder.mkdir()
    if config is not None:
        (folder / "config.json").write_text(config if isinstance(config, str) else json.dumps(config))
    if weights:
        (folder / "model.safetensors").write_bytes((checkpoint_dir / "model.safetensors").read_bytes())
    for name in extra:
        (folder / name).write_bytes(b"\x80\x02")
    return str(folder)


CONFIG = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "max_position_embeddings": 64}


@pytest.mark.parametrize("case, fragment", [
    ({"config": None}, "is not a Hugging Face model directory (no config.json)"),
    ({"config": "{not json"}, "is not valid JSON"),
    ({"config": "[1, 2]"}, "is not a JSON object"),
    ({"config": {**CONFIG, "architectures": ["LlamaModel"]}}, "is not a causal language model"),
    ({"config": {**CONFIG, "architectures": None}}, "architectures: none"),
    ({"config": {**CONFIG, "model_type": "gpt2"}}, "model_type 'gpt2' is not supported (supported: llama, mistral"),
    ({"config": CONFIG, "weights": False, "extra": ["pytorch_model.bin"]}, "has only pickle weights (.bin/.pt)"),
    ({"config": CONFIG, "weights": False}, "holds no *.safetensors weights"),
])
def test_a_directory_that_is_not_a_supported_checkpoint_is_refused(checkpoint_dir, tmp_path, case, fragment):
    folder = _copy_without(checkpoint_dir, tmp_path / "m", **case)
    with pytest.raises(UserError) as refused:
        source.resolve_source(folder)
    assert fragment in str(refused.value), str(refused.value)


def test_remote_code_lets_an_unknown_model_type_through(checkpoint_dir, tmp_path):
    folder = _copy_without(checkpoint_dir, tmp_path / "m", {**CONFIG, "model_type": "mystery"})
    found = source.resolve_source(folder, trust_remote_code=True)
    assert found.model_type == "mystery" and found.context == 64


@pytest.mark.parametrize("name, content, fragment", [
    ("weights.txt", b"hello", "is a file but not a .gguf"),
    ("model.gguf", b"GGML\x00\x00\x00\x00", "is not a GGUF file (bad magic bytes)"),
    ("model.gguf", b"GGUF\x03\x00\x00\x00garbage", "is not a readable GGUF model"),
])
def test_a_file_that_is_not_a_gguf_model_is_refused(tmp_path, name, content, fragment):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(UserError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        source.resolve_source(str(tmp_path / name))


@pytest.mark.parametrize("spec, fragment", [
    ("/no/such/model", "model path not found: /no/such/model"),
    ("./missing.gguf", "model path not found"),
    ("absorbdeploy-tests/not-in-the-cache", "is not in the local Hugging Face cache and absorbdeploy never downloads"),
    ("just some words", "is neither a local path nor a hub id"),
])
def test_missing_paths_and_uncached_hub_ids_are_refused(spec, fragment):
    with pytest.raises(UserError, match=fragment):
        source.resolve_source(spec)
