"""Reading a checkpoint without loading it: consistency with the config, quantization layouts, the index, dtypes."""

import json

import pytest
import torch
from safetensors.torch import save_file

from absorbdeploy import checkpoint
from absorbdeploy.sparse import codec
from absorbdeploy.sparse.codec import compress_bitmask
from absorbdeploy.errors import UserError


def test_consistency_problems_name_missing_extra_and_misshapen_tensors():
    expected = {"a.weight": (2, 3), "lm_head.weight": (4, 3), "embed.weight": (4, 3)}
    tied = {"lm_head.weight": "embed.weight"}
    assert checkpoint.consistency_problems(expected, {"a.weight": (2, 3), "embed.weight": (4, 3)}, tied) == []
    problems = checkpoint.consistency_problems(expected, {"a.weight": (3, 2), "embed.weight": (4, 3), "b.weight": (1,),
                                                          "x.rotary_emb.inv_freq": (2,)}, {})
    assert problems == ["a.weight has shape [3, 2] on disk but the config implies [2, 3]",
                        "lm_head.weight is missing from the checkpoint", "b.weight is on disk but the config has no such tensor"]


CT = {"quant_method": "compressed-tensors"}


@pytest.mark.parametrize("quant, layout", [  # the shapes public compressed-tensors checkpoints carry, and ours
    (None, None),
    ({**CT, "sparsity_config": {"format": "sparse-bitmask"}}, "sparse-bitmask"),
    ({**CT, "sparsity_config": {"format": "sparse-24-bitmask", "sparsity_structure": "2:4"}}, "sparse-24-bitmask"),
    ({**CT, "sparsity_config": {"format": "dense", "global_sparsity": 0.5}}, checkpoint.DENSE),  # sparsity-only
    ({**CT, "format": "dense", "config_groups": None, "sparsity_config": {"format": "dense"}}, checkpoint.DENSE),
    ({**CT, "config_groups": {}, "sparsity_config": None}, checkpoint.DENSE),  # empty config_groups
    ({**CT, "format": "dense", "sparsity_config": {"format": "sparse-bitmask"}}, "sparse-bitmask"),
    (CT, checkpoint.DENSE),
    ({"quant_method": codec.SERVED_SPARSE_METHOD}, "sparse-bitmask"),
])
def test_layouts_we_decode_are_accepted(quant, layout):
    config = {} if quant is None else {"quantization_config": quant}
    assert checkpoint.stored_layout(config, "m") == layout


@pytest.mark.parametrize("quant, fragment", [
    ({"quant_method": "awq", "bits": 4, "group_size": 128}, "quant_method 'awq' (bits 4, group_size 128)"),
    ({"quant_method": "fp8"}, "quant_method 'fp8'"),
    ({**CT, "config_groups": {"g": {}}}, "quantized weights"),
    ({**CT, "format": "pack-quantized", "config_groups": {"group_0": {"weights": {"num_bits": 4}}},
      "sparsity_config": {"format": "sparse-24-bitmask"}}, "quantized weights (config_groups, format 'pack-quantized')"),
    ({**CT, "format": "float-quantized"}, "format 'float-quantized'"),  # a quantization format, no groups
    ({**CT, "sparsity_config": {"format": "marlin-24"}}, "sparsity format 'marlin-24'"),
    ({**CT, "sparsity_config": "sparse-bitmask"}, "sparsity format '?'"),
    ("not a mapping", "quant_method None"),
])
def test_other_quantization_is_refused(quant, fragment):
    with pytest.raises(UserError, match="pass the original") as e:
        checkpoint.stored_layout({"quantization_config": quant}, "m")
    assert fragment in str(e.value)


def _compressed_dir(folder):
    w = torch.tensor([[0.0, 1.0, 2.0], [3.0, 0.0, 0.0]], dtype=torch.bfloat16)
    parts = {f"m.{k}": v for k, v in compress_bitmask(w).items()}
    save_file({**parts, "n.weight": torch.ones(2, dtype=torch.bfloat16)}, str(folder / "model.safetensors"))
    return w


def test_tensor_table_and_index_read_a_compressed_module_as_its_dense_weight(tmp_path):
    w = _compressed_dir(tmp_path)
    table = checkpoint.tensor_table(checkpoint.check_index(tmp_path))
    assert table == {"m.weight": ("BF16", (2, 3)), "n.weight": ("BF16", (2,))}
    assert checkpoint.source_dtype(table) == "bfloat16"
    index = checkpoint.ShardIndex(tmp_path, "sparse-bitmask")
    assert index.names == ["m.weight", "n.weight"] and "m.weight" in index
    assert torch.equal(index.read(["m.weight"])["m.weight"], w)


def test_an_index_must_name_files_and_tensors_that_exist(tmp_path):
    save_file({"a": torch.zeros(1)}, str(tmp_path / "one.safetensors"))
    index = tmp_path / checkpoint.INDEX
    index.write_text(json.dumps({"weight_map": {"a": "one.safetensors", "b": "two.safetensors"}}))
    with pytest.raises(UserError, match="to two.safetensors, which is missing"):
        checkpoint.check_index(tmp_path)
    index.write_text(json.dumps({"weight_map": {"a": "one.safetensors", "c": "one.safetensors"}}))
    with pytest.raises(UserError, match="says one.safetensors holds c, but it does not"):
        checkpoint.check_index(tmp_path)
    index.write_text("{}")
    with pytest.raises(UserError, match="not a valid safetensors index"):
        checkpoint.check_index(tmp_path)


def test_mixed_or_32_bit_weights_count_as_float32():
    assert checkpoint.source_dtype({"a": ("F16", (1,)), "b": ("I64", (1,))}) == "float16"
    assert checkpoint.source_dtype({"a": ("F16", (1,)), "b": ("F32", (1,))}) == "float32"
