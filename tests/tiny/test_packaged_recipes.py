"""Every packaged recipe runs every command it applies to (on the tiny model: the recipes' settings must agree with
each other, whatever model they meet)."""

import json

import pytest

from absorbdeploy import recipe as rc
from tests.conftest import run_cli

RECIPES = sorted(rc.packaged_recipes())


@pytest.mark.parametrize("name", RECIPES)
def test_prune_and_export_runs(name, tmp_path):
    out = tmp_path / "out"
    proc = run_cli("prune-and-export", "builtin:tiny-llama", "--recipe", name, "--formats", "compressed-safetensors",
                   "--set", "validate.latency.enabled=false", "--out", out)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads((out / "report.json").read_text())
    assert report["allocation"]["exact"] and report["recipe"]["origin"] == name


@pytest.mark.parametrize("name", RECIPES)
def test_analyze_runs(name, tmp_path):
    proc = run_cli("analyze", "builtin:tiny-llama", "--recipe", name, "--out", tmp_path / "out")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "out" / "absorption.json").is_file()


@pytest.mark.parametrize("cheaper", ["absorption.horizon=1", "absorption.injection_stride=2"])
def test_analyze_draws_a_cheaper_probe(cheaper, tmp_path):
    """A probe that follows each error fewer blocks, or injects at fewer blocks, leaves gaps in the drift curves: the
    profile and both plots still come out, and the JSON records which probe made them."""
    out = tmp_path / "out"
    proc = run_cli("analyze", "builtin:tiny-llama", "--recipe", "smoke-tiny", "--set", cheaper, "--out", out)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert all((out / f).stat().st_size > 0 for f in ("absorption.png", "absorption_eps.png"))
    profile = json.loads((out / "absorption.json").read_text())
    key, value = cheaper.split("=")
    assert profile["probe"][key.split(".")[1]] == int(value)
    rows = profile["curves"]["1.0"]["rel"]
    assert any(row[k] is None for l, row in enumerate(rows[:-1]) for k in range(l, len(row)))  # gaps past injection
