"""A damaged `bitmask/` directory is refused before any runtime uses it: `check_directory` names the module and the
mismatch, `absorbdeploy serve` exits 2 with that line (vLLM is never started), and an intact export passes."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from absorbdeploy import exporters
from absorbdeploy.sparse.codec import WEIGHTS_INDEX, PackedFormatError
from absorbdeploy.sparse.directory import check_directory
from tests.conftest import run_cli
from tests.tiny.test_exporters import pruned_tiny

UP = "model.layers.1.mlp.up_proj"


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    model, tokenizer, spec = pruned_tiny("bfloat16")
    out = tmp_path_factory.mktemp("bitmask") / "bitmask"
    exporters.get("bitmask").export(model, tokenizer, out, spec("bitmask"))
    return out


def damaged(source, target, tensors=None, quantization=None):
    """A copy of an export with `tensors(state)` applied to its weights (the index rewritten to match) and
    `quantization(config)` to its quantization_config."""
    shutil.copytree(source, target)
    index = json.loads((target / WEIGHTS_INDEX).read_text())
    files = sorted(set(index["weight_map"].values()))
    state = {k: v for f in files for k, v in load_file(str(target / f)).items()}
    if tensors:
        state = tensors(state)
    for f in files:
        (target / f).unlink()
    save_file(state, str(target / files[0]), metadata={"format": "pt"})
    index["weight_map"] = {k: files[0] for k in sorted(state)}
    (target / WEIGHTS_INDEX).write_text(json.dumps(index))
    if quantization:
        config = json.loads((target / "config.json").read_text())
        config["quantization_config"] = quantization(config["quantization_config"])
        (target / "config.json").write_text(json.dumps(config))
    return target


def _extra_bit(state):
    bits = state[f"{UP}.bitmask"]
    row = bits[0].clone()
    free = next(c for c in range(8 * row.numel()) if not row[c // 8] >> (c % 8) & 1)
    bits[0, free // 8] |= 1 << (free % 8)
    return state


def _shifted_offsets(state):
    state[f"{UP}.row_offsets"][5:] += 1
    return state


def _shape_of_another_linear(state):
    state[f"{UP}.shape"] = torch.tensor([int(state[f"{UP}.shape"][0]) // 2, int(state[f"{UP}.shape"][1])])
    return state


# kind -> (weights edit, quantization_config edit, what the one line says)
DAMAGE = {
    "a row with one more bit than its values": (_extra_bit, None, f"{UP}: the bitmask has"),
    "row offsets shifted but increasing": (_shifted_offsets, None, f"{UP}.row_offsets: row 5 starts at"),
    "a dropped bitmask": (lambda s: {k: v for k, v in s.items() if k != f"{UP}.bitmask"}, None,
                          f"{UP}: listed in quantization_config.targets, but the checkpoint has no {UP}.bitmask"),
    "a packed module missing from targets": (None, lambda q: {**q, "targets": [t for t in q["targets"] if t != UP]},
                                             f"{UP}: the checkpoint holds packed tensors for it, but"),
    "a target that is not a Linear": (None, lambda q: {**q, "targets": [*q["targets"], "model.norm"]},
                                      "model.norm: listed in quantization_config.targets, but the checkpoint has no"),
    "an unknown values dtype": (None, lambda q: {**q, "values_dtype": "load"}, "values_dtype 'load'"),
    "targets that are not a list of names": (None, lambda q: {**q, "targets": UP}, "targets must be a list"),
    "values in fp32": (lambda s: {**s, f"{UP}.compressed": s[f"{UP}.compressed"].float()}, None,
                       f"{UP}.compressed: dtype float32, the format stores bfloat16"),
    "a matrix of another Linear's size": (_shape_of_another_linear, None, f"{UP}.shape: says [128, 128], the model's Linear is [256, 128]"),
}


def test_an_intact_export_passes(exported):
    assert check_directory(exported) == 28


def test_a_checkpoint_that_is_not_a_bitmask_export_has_nothing_to_check(tmp_path, exported):
    assert check_directory(tmp_path) == 0  # no config.json (an ONNX export)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    assert check_directory(tmp_path) == 0


@pytest.mark.parametrize("kind", list(DAMAGE))
def test_each_damage_is_refused_with_one_line(exported, tmp_path, kind):
    tensors, quantization, message = DAMAGE[kind]
    folder = damaged(exported, tmp_path / "bitmask", tensors, quantization)
    with pytest.raises(PackedFormatError) as refused:
        check_directory(folder)
    assert message in str(refused.value) and "\n" not in str(refused.value)


@pytest.mark.parametrize("kind", ["row offsets shifted but increasing", "a packed module missing from targets"])
def test_serve_exits_2_with_the_line_before_starting_vllm(exported, tmp_path, kind):
    pytest.importorskip("vllm")
    tensors, quantization, message = DAMAGE[kind]
    folder = damaged(exported, tmp_path / "bitmask", tensors, quantization)
    result = run_cli("serve", str(folder))
    assert result.returncode == 2 and result.stderr.startswith("error: ") and message in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "vLLM API server" not in result.stdout
