"""The files every exporter writes: shards and their index, the packed bitmask layouts and their decoding, the sidecar,
the file listing and the sparsity audit read back from disk."""

import json

import pytest
import torch
from safetensors.torch import load_file

from absorbdeploy import export_files
from absorbdeploy.checkpoint import ShardIndex
from absorbdeploy.errors import UserError
from absorbdeploy.export_files import Audit, ShardWriter
from absorbdeploy.exporters import ExportSpec


def test_parse_size_reads_decimal_and_binary_units():
    assert export_files.parse_size("5GB") == 5 * 1000**3
    assert export_files.parse_size("300KB") == 300_000
    assert export_files.parse_size("1.5 MiB") == 3 * 2**19
    assert export_files.parse_size("2GiB") == 2 * 1024**3


def test_streaming_caps_the_shards_it_buffers():
    """Pruned blocks wait in memory until their shard is written: streaming never buffers a 5 GB shard."""
    assert export_files.streaming_shard_bytes("5GB") == export_files.STREAMING_SHARD_CAP == 512 * 2**20
    assert export_files.streaming_shard_bytes("100MB") == 10**8


def test_shard_writer_keeps_groups_together(tmp_path):
    writer = ShardWriter(tmp_path, max_shard_bytes=100)
    writer.add({"a": torch.zeros(20)})  # 80 bytes
    writer.add({"m.shape": torch.zeros(2), "m.compressed": torch.zeros(10), "m.bitmask": torch.zeros(2)}, group=True)
    writer.add({"b": torch.zeros(30)})
    writer.finish()
    index = ShardIndex(tmp_path)
    assert len({index.map[k] for k in ("m.shape", "m.compressed", "m.bitmask")}) == 1
    assert len(set(index.map.values())) == 3 and torch.equal(index.read(["b"])["b"], torch.zeros(30))


def test_shard_writer_names_shards_like_save_pretrained_and_indexes_them(tmp_path):
    tensors = {f"t{i}": torch.arange(i * 10, i * 10 + 25, dtype=torch.float32) for i in range(5)}  # 100 bytes each
    writer = ShardWriter(tmp_path / "many", max_shard_bytes=250)
    for name, t in tensors.items():
        writer.add({name: t})
    writer.finish()
    names = sorted(p.name for p in (tmp_path / "many").glob("*.safetensors"))
    assert names == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    index = json.loads((tmp_path / "many" / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == 5 * 100
    assert set(index["weight_map"]) == set(tensors) and set(index["weight_map"].values()) == set(names)
    stored = {k: v for n in names for k, v in load_file(str(tmp_path / "many" / n)).items()}
    assert all(torch.equal(stored[k], tensors[k]) for k in tensors)

    single = ShardWriter(tmp_path / "one", max_shard_bytes=10**6)
    single.add(tensors)
    single.finish()
    assert sorted(p.name for p in (tmp_path / "one").iterdir()) == ["model.safetensors"]  # no index for one shard


def test_unique_state_dict_stores_tied_weights_once_in_the_asked_dtype(tiny):
    model, _ = tiny
    state = export_files.unique_state_dict(model, torch.bfloat16)
    assert "model.embed_tokens.weight" in state and "lm_head.weight" not in state  # tied: one tensor
    assert all(t.dtype == torch.bfloat16 for t in state.values())
    assert torch.equal(state["model.layers.0.mlp.up_proj.weight"], model.model.layers[0].mlp.up_proj.weight.bfloat16())


def _spec(names, **kw):
    return ExportSpec(dtype="bfloat16", prunable=tuple(names), **kw)


def test_sidecar_round_trip_and_refusal_of_a_foreign_folder(tmp_path):
    spec = _spec(["a.weight", "b.weight"], nm=(2, 4), sidecar={"allocation": {"realised": 0.5}})
    export_files.write_sidecar(tmp_path, spec, "bitmask", layout="sparse-24-bitmask")
    meta = export_files.read_sidecar(tmp_path)
    assert meta == {"format": "bitmask", "dtype": "bfloat16", "nm": [2, 4], "prunable": ["a.weight", "b.weight"],
                    "allocation": {"realised": 0.5}, "layout": "sparse-24-bitmask"}
    with pytest.raises(UserError, match="no absorbdeploy.json"):
        export_files.read_sidecar(tmp_path / "elsewhere")


def test_list_files_walks_subfolders_with_sizes(tmp_path):
    (tmp_path / "kv").mkdir()
    (tmp_path / "model.onnx").write_bytes(b"x" * 7)
    (tmp_path / "kv" / "decode.onnx").write_bytes(b"y" * 3)
    assert export_files.list_files(tmp_path) == {"kv/decode.onnx": 3, "model.onnx": 7}


def test_audit_counts_zeros_over_the_prunable_set_only():
    a = torch.tensor([[0.0, 1.0, 0.0, 2.0]])  # 2 of 4 zero, 2:4 in its one group
    b = torch.tensor([[0.0, 0.0, 0.0, 3.0], [1.0, 1.0, 1.0, 1.0]])  # 3 of 8 zero, not 2:4
    audit = Audit(["a", "b"], None)
    audit.add({"a": a, "other": torch.zeros(10)})  # not prunable: ignored
    audit.add({"b": b, "a": torch.ones(4)})  # a second copy of `a` is not counted again
    result = audit.result()
    assert (result["zeros"], result["weights"]) == (5, 12) and result["sparsity"] == pytest.approx(5 / 12)
    assert result["per_tensor"] == {"a": 0.5, "b": 3 / 8} and "nm_valid" not in result
    two_four = Audit(["a"], (2, 4))
    two_four.add({"a": a})
    assert two_four.result()["nm_valid"] is True
    broken = Audit(["a", "b"], (2, 4))
    broken.add({"a": a, "b": b})
    assert broken.result()["nm_valid"] is False


def test_audit_refuses_an_incomplete_export():
    audit = Audit(["a", "b", "c"], None)
    audit.add({"b": torch.zeros(3)})
    with pytest.raises(UserError, match=r"lacks 2 pruned tensors \(e.g. a\); it is incomplete"):
        audit.result()


def test_describe_export_reports_files_bytes_and_audit(tmp_path):
    writer = ShardWriter(tmp_path, max_shard_bytes=10**6)
    writer.add({"w": torch.tensor([0.0, 0.0, 1.0, 0.0]), "bias": torch.ones(2)})
    writer.finish()
    export_files.write_sidecar(tmp_path, _spec(["w"]), "vllm")
    described = export_files.describe_export(tmp_path, [load_file(str(tmp_path / "model.safetensors"))], note="x")
    sizes = {p.name: p.stat().st_size for p in tmp_path.iterdir()}
    assert described["files"] == sizes and described["bytes"] == sum(sizes.values())
    assert described["format"] == "vllm" and described["note"] == "x"
    assert described["audit"]["zeros"] == 3 and described["audit"]["weights"] == 4


def _sparsify(model, names):
    """Zero the half of every prunable matrix with the smallest |w| (by sorting, not by the code under test)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name in names:
                flat = p.view(-1)
                flat[flat.abs().argsort()[: flat.numel() // 2]] = 0


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_write_packed_then_decoded_shards_give_back_every_tensor(tiny, tmp_path, dtype):
    model, tokenizer = tiny
    names = [n for n, _ in model.named_parameters() if n.startswith("model.layers.") and n.endswith("proj.weight")]
    _sparsify(model, names)
    spec = ExportSpec(dtype=dtype, prunable=tuple(names), max_shard_size="200KB")
    export_files.write_packed(model, tokenizer, tmp_path, spec, "sparse-bitmask", {"model_type": "llama"})
    files = sorted(tmp_path.glob("*.safetensors"))
    assert len(files) > 1 and json.loads((tmp_path / "config.json").read_text()) == {"model_type": "llama"}
    raw = {k: v for f in files for k, v in load_file(str(f)).items()}
    assert not set(names) & set(raw)  # every prunable weight is stored packed
    w0 = dict(model.named_parameters())[names[0]]
    assert raw[names[0][: -len(".weight")] + ".compressed"].numel() == int((w0 != 0).sum())
    decoded = {k: v for shard in export_files.decoded_shards(tmp_path, "sparse-bitmask") for k, v in shard.items()}
    expected = {n: p.detach().to(getattr(torch, dtype)) for n, p in model.named_parameters() if n != "lm_head.weight"}
    assert set(decoded) == set(expected)
    assert all(torch.equal(decoded[k], expected[k]) for k in expected)


def test_write_packed_refuses_two_four_of_a_tensor_that_is_not(tiny, tmp_path):
    model, tokenizer = tiny
    name = "model.layers.0.mlp.down_proj.weight"
    spec = ExportSpec(dtype="bfloat16", prunable=(name,), nm=(2, 4))
    with pytest.raises(UserError):
        export_files.write_packed(model, tokenizer, tmp_path, spec, "sparse-24-bitmask", {})
