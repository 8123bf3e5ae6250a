"""The exporters registry (exporters/__init__.py): which formats are installed and selected, the refusals that name the
fix, the one builder of an ExportSpec, streaming's spec and the runtime a format's `load` opens. The formats themselves
are tested in tests/tiny/test_exporters.py."""

import dataclasses

import pytest

from absorbdeploy import exporters
from absorbdeploy.errors import UserError
from absorbdeploy.exporters import Format, Runtime, RuntimeOptions
from absorbdeploy.recipe import Export, OnnxOptions


@pytest.fixture()
def table(monkeypatch):
    """Three formats: `a` stores every dtype, `b` only 16-bit ones, `c` needs a module that is not installed."""
    formats = {
        "a": Format("a", "", ("json",), "extra-a"),
        "b": Format("b", "", (), "extra-b", ("bfloat16", "float16")),
        "c": Format("c", "", ("json", "no_such_module_for_absorbdeploy"), "absorbdeploy[c]"),
    }
    monkeypatch.setattr(exporters, "FORMATS", formats)
    return formats


def test_installed_leaves_out_a_format_whose_runtime_is_missing(table):
    assert exporters.missing_modules("c") == ["no_such_module_for_absorbdeploy"] and exporters.missing_modules("a") == []
    assert exporters.installed() == ["a", "b"]


def test_select_by_default_takes_every_installed_format_that_stores_the_dtype(table):
    assert exporters.select(None, "bfloat16") == (("a", "b"), [])
    chosen, notes = exporters.select(None, "float32")
    assert chosen == ("a",) and notes == ["export.formats leaves out b: it stores no float32 weights"]


def test_select_keeps_an_explicit_list_in_its_order(table):
    assert exporters.select(["b", "a"], "float16") == (("b", "a"), [])


@pytest.mark.parametrize("requested, dtype, fragments", [
    (["a", "zzz"], "bfloat16", ["unknown export format 'zzz'", "formats: a, b, c"]),
    (["c"], "bfloat16", ["format 'c' needs no_such_module_for_absorbdeploy", "pip install 'absorbdeploy[c]'", "--formats"]),
    (["a", "b"], "float32", ["format 'b' stores bfloat16 or float16 weights, not float32", "export.dtype"]),
])
def test_select_refuses_what_it_cannot_write_and_says_what_to_do(table, requested, dtype, fragments):
    with pytest.raises(UserError) as refused:
        exporters.select(requested, dtype)
    assert all(f in str(refused.value) for f in fragments), str(refused.value)


def test_get_checks_availability_before_importing(table):
    with pytest.raises(UserError, match="needs no_such_module"):
        exporters.get("c")


def test_get_imports_the_format_module():
    module = exporters.get("compressed-safetensors")
    assert module.__name__ == "absorbdeploy.exporters.compressed_safetensors" and module.FORMAT == "compressed-safetensors"


def test_spec_for_nests_a_formats_options_and_dtype_under_it():
    export = Export(dtype="bfloat16", max_shard_size="2GB", onnx=dataclasses.replace(OnnxOptions(), dtype="float16"))
    names = ["model.layers.0.mlp.up_proj.weight"]
    onnx = exporters.spec_for("onnx", export, names, (2, 4), {"run": 1})
    assert (onnx.dtype, onnx.options, onnx.nm, onnx.max_shard_size) == ("float16", export.onnx, (2, 4), "2GB")
    assert onnx.prunable == tuple(names) and onnx.sidecar == {"run": 1}
    plain = exporters.spec_for("compressed-safetensors", export, iter(names), None)  # no options section of its own
    assert (plain.dtype, plain.options, plain.sidecar, plain.prunable) == ("bfloat16", None, {}, tuple(names))
    assert plain.streamed is None and plain.checkpoint is None


def test_streamed_gives_the_writer_to_the_checkpoint_format_and_the_folder_to_the_others(tmp_path):
    spec = exporters.spec_for("vllm", Export(dtype="bfloat16"), ["w"], None)
    writer = object()
    own = exporters.streamed(spec, exporters.CHECKPOINT_FORMAT, writer, tmp_path)
    other = exporters.streamed(spec, "bitmask", writer, tmp_path)
    assert own.streamed is writer and own.checkpoint is None
    assert other.streamed is None and other.checkpoint == str(tmp_path)
    assert spec.streamed is None and spec.checkpoint is None  # the spec it was given is left as it was


def test_open_in_opens_the_first_runtime_unless_one_is_named():
    opened = []
    runtimes = {"own": Runtime("torch", (), lambda d, o: opened.append(("own", d, o)) or "own runner"),
                "other": Runtime("vllm", ("vllm",), lambda d, o: opened.append(("other", d, o)) or "other runner")}
    default, named = RuntimeOptions(), RuntimeOptions(name="other")
    assert exporters.open_in(runtimes, "DIR", default) == "own runner"
    assert exporters.open_in(runtimes, "DIR", named) == "other runner"
    assert opened == [("own", "DIR", default), ("other", "DIR", named)]
    with pytest.raises(KeyError):
        exporters.open_in(runtimes, "DIR", RuntimeOptions(name="nowhere"))


def test_artifact_bytes_sum_its_files():
    artifact = exporters.Artifact("vllm", "out/vllm", {"a": 3, "b/c": 4}, 0.5)
    assert artifact.bytes == 7 and artifact.notes == []
