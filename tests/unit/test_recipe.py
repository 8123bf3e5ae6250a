import dataclasses

import pytest
import yaml

from absorbdeploy import recipe as rc
from absorbdeploy.errors import UserError


@pytest.mark.parametrize("name", sorted(rc.packaged_recipes()))
def test_packaged_recipe_loads_and_round_trips(name):
    r, origin = rc.resolve(name)
    assert origin == name and r.description
    again = rc.from_yaml_text(rc.to_yaml(r), "round-trip")
    assert again == r


def test_defaults_are_one_recipe_object():
    r, origin = rc.resolve(None)
    assert origin == "defaults" and r == rc.Recipe()
    rc.check(r)


def test_resolve_prefers_an_existing_file(tmp_path):
    path = tmp_path / "smoke-tiny"
    path.write_text("version: 1\nprune: {sparsity: 0.6}\n")
    r, origin = rc.resolve(str(path))
    assert origin == str(path) and r.prune.sparsity == 0.6


def test_unknown_recipe_lists_packaged_names():
    with pytest.raises(UserError) as e:
        rc.resolve("no-such-recipe")
    message = str(e.value)
    assert "unknown recipe 'no-such-recipe'" in message
    for name in rc.packaged_recipes():
        assert name in message


@pytest.mark.parametrize(
    "text, expected",
    [
        ("version: 1\ncalibration: {nsampels: 3}\n", "unknown key 'calibration.nsampels'"),
        ("version: 1\nprune: {sparsity: high}\n", "'prune.sparsity' must be a number, got 'high'"),
        ("version: 1\ncalibration: {nsamples: 2.5}\n", "'calibration.nsamples' must be an integer"),
        ("version: 1\nabsorption: {enabled: 1}\n", "'absorption.enabled' must be true or false"),
        ("version: 2\n", "unsupported version 2"),
        ("prune: {sparsity: 0.5}\n", "has no 'version' key"),
        ("version: 1\nprune: [1, 2\n", "is not valid YAML"),
        ("- 1\n- 2\n", "must be a YAML mapping"),
        ("version: 1\nprune: 0.5\n", "'prune' must be a mapping"),
        ("version: 1\nprune: {sparsity: 1.0}\n", "prune.sparsity must be in [0, 1)"),
        ("version: 1\nprune: {structure: '4:4', sparsity: 0.5}\n", "need 0 < N < M"),
        ("version: 1\nprune: {structure: '2:4', sparsity: 0.6}\nallocation: {method: uniform}\n", "fixes the sparsity at 0.5"),
        ("version: 1\nallocation: {min: 0.9, max: 0.5}\n", "need 0 <= min < max < 1"),
        ("version: 1\nprune: {sparsity: 0.9}\nallocation: {max: 0.8}\n", "outside [allocation.min, allocation.max]"),
        ("version: 1\nexport: {formats: [tflite]}\n", "export.formats must be one of"),
        ("version: 1\nabsorption: {injection_stride: 0}\n", "absorption.injection_stride must be >= 1"),
    ],
)
def test_bad_recipes_are_one_line_user_errors(text, expected):
    with pytest.raises(UserError) as e:
        rc.from_yaml_text(text, "test")
    assert expected in str(e.value)
    assert "\n" not in str(e.value)


def test_set_overrides_are_typed():
    r = rc.Recipe()
    r = rc.override(r, "prune.sparsity=0.6")
    r = rc.override(r, "absorption.strength=0")
    r = rc.override(r, "export.formats=[vllm, onnx]")
    r = rc.override(r, "validate.eval_windows=null")
    r = rc.override(r, "allocation.owl={lam: 0.1}")
    assert r.prune.sparsity == 0.6 and isinstance(r.prune.sparsity, float)
    assert r.absorption.strength == 0.0 and r.export.formats == ("vllm", "onnx")
    assert r.validate.eval_windows is None and r.allocation.owl.lam == 0.1 and r.allocation.owl.m == 5.0


@pytest.mark.parametrize(
    "assignment, expected",
    [
        ("prune.sparsty=0.5", "unknown key 'prune.sparsty'"),
        ("nothing", "expected KEY=VALUE"),
        ("calibration.nsamples=abc", "'calibration.nsamples' must be an integer, got 'abc'"),
        ("prune.sparsity.x=1", "'sparsity' has no sub-keys"),
        ("prune=3", "is a section"),
        ("version=2", "cannot be overridden"),
    ],
)
def test_bad_overrides(assignment, expected):
    with pytest.raises(UserError) as e:
        rc.override(rc.Recipe(), assignment)
    assert expected in str(e.value)


def test_resolved_yaml_is_complete_and_safe():
    text = rc.to_yaml(rc.Recipe())
    data = yaml.safe_load(text)
    assert data["version"] == 1 and set(data) == {f.name for f in dataclasses.fields(rc.Recipe)}
    assert "!!python" not in text


def test_yaml_12_scalars():
    r = rc.override(rc.Recipe(), "streaming.mode=on")
    assert r.streaming.mode == "on"
    r = rc.from_yaml_text("version: 1\nprune: {structure: 2:4, sparsity: 0.5}\nallocation: {method: uniform}\n"
                          "absorption: {enabled: false}\n"
                          "validate: {gates: {max_abs_logit_diff: 1e-3}}\n", "yaml-1.2")
    assert r.prune.structure == (2, 4) and str(r.prune.structure) == "2:4" and r.validate.gates.max_abs_logit_diff == 0.001
    assert rc.override(r, "absorption.enabled=true").absorption.enabled is True


def test_set_value_takes_typed_values_without_yaml():
    r = rc.set_value(rc.Recipe(), "calibration.text", "null", "--text")
    assert r.calibration.text == "null"
    with pytest.raises(UserError, match="--seed: 'calibration.seed' must be an integer"):
        rc.set_value(rc.Recipe(), "calibration.seed", "7", "--seed")
