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
