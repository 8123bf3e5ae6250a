"""The pipeline in-process on builtin:tiny-llama with one format: preflight settles and checks without writing anything,
and run leaves a complete DIR/ (never DIR.tmp/) whose pruned weights, read back from disk, hold exactly the budget's
zeros. The same run through the CLI subprocess is tests/tiny/test_cli.py."""

import dataclasses
import json

import pytest

from absorbdeploy import exporters, pipeline
from absorbdeploy import recipe as rc
from absorbdeploy.errors import UserError
from absorbdeploy.progress import Progress
from absorbdeploy.tiny import TINY_CONFIG

FORMAT = "compressed-safetensors"


def _recipe(*assignments):
    r, _ = rc.resolve("smoke-tiny")
    for a in (f"export.formats=[{FORMAT}]", *assignments):
        r = rc.override(r, a)
    return r


def _prunable_weights() -> int:
    c = TINY_CONFIG
    kv = c["num_key_value_heads"] * c["hidden_size"] // c["num_attention_heads"]
    per_block = 2 * c["hidden_size"] ** 2 + 2 * c["hidden_size"] * kv + 3 * c["hidden_size"] * c["intermediate_size"]
    return c["num_hidden_layers"] * per_block


def test_preflight_settles_and_checks_without_writing(tmp_path):
    out = tmp_path / "run"
    plan = pipeline.preflight(_recipe("calibration.seqlen=null"), out, False, False, "smoke-tiny")
    assert plan.source.kind == "builtin" and plan.formats == (FORMAT,)
    assert plan.recipe.calibration.seqlen == 512 and plan.recipe.export.dtype == "bfloat16"  # followed their defaults
    assert not out.exists() and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("assignments, prepare, fragment", [
    ([], "exists", "--overwrite"),
    (["export.formats=[tflite]"], None, "export.formats must be one of"),
    (["export.formats=[bitmask]", "export.dtype=float32"], None, "format 'bitmask' stores bfloat16 or float16 weights"),
    (["validate.seqlen=2048"], None, "1024"),  # longer than the model's context
    (["calibration.text=/no/such/text.txt"], None, "/no/such/text.txt"),
])
def test_preflight_refuses_before_any_model_is_loaded(tmp_path, assignments, prepare, fragment):
    out = tmp_path / "run"
    if prepare == "exists":
        out.mkdir()
    with pytest.raises(UserError, match=fragment.replace("[", r"\[")):
        pipeline.preflight(_recipe(*assignments), out, False, False, "smoke-tiny")
    assert sorted(p.name for p in tmp_path.iterdir()) == (["run"] if prepare else [])


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    out = tmp_path_factory.mktemp("pipeline") / "run"
    plan = pipeline.preflight(_recipe(), out, False, False, "smoke-tiny")
    progress = Progress(len(pipeline.STAGES), quiet=True)
    return out, pipeline.run(plan, progress), progress


def test_run_commits_a_complete_directory(finished):
    out, payload, progress = finished
    assert payload["output"] == str(out) and payload["status"] == "passed"
    assert not out.with_name(out.name + ".tmp").exists()
    for name in ("recipe.resolved.yaml", "allocation.csv", "report.json", "report.md", f"{FORMAT}/config.json",
                 f"{FORMAT}/absorbdeploy.json"):
        assert (out / name).is_file(), name
    assert json.loads((out / "report.json").read_text())["status"] == "passed"
    assert set(progress.stages) == set(pipeline.STAGES)  # every stage ran and was timed
    assert set(payload["artefacts"]) == {FORMAT}


def test_the_pruned_weights_on_disk_hold_exactly_the_budget(finished):
    out, payload, _ = finished
    prunable = set(json.loads((out / FORMAT / "absorbdeploy.json").read_text())["prunable"])
    assert len(prunable) == 7 * TINY_CONFIG["num_hidden_layers"]
    tensors = {k: v for shard in exporters.get(FORMAT).tensors(out / FORMAT) for k, v in shard.items() if k in prunable}
    assert set(tensors) == prunable
    zeros = sum(int((t == 0).sum()) for t in tensors.values())
    assert sum(t.numel() for t in tensors.values()) == _prunable_weights()
    assert zeros == round(0.5 * _prunable_weights()) == payload["allocation"]["zeros"]


def test_streaming_puts_the_checkpoint_format_first():
    plan = pipeline.Plan(_recipe(), None, ("onnx", FORMAT, exporters.CHECKPOINT_FORMAT), None, False, False, "x")
    assert pipeline._formats_for(plan, streaming=False) == plan.formats
    assert pipeline._formats_for(plan, streaming=True) == (exporters.CHECKPOINT_FORMAT, "onnx", FORMAT)
    alone = dataclasses.replace(plan, formats=("onnx",))
    assert pipeline._formats_for(alone, streaming=True) == (exporters.CHECKPOINT_FORMAT, "onnx")


def test_a_run_with_the_admm_update_reconstruction_and_absorption_keeps_the_budget_and_reports_them(tmp_path):
    """The update and the reconstruction run inside the sequential prune and the probe prunes with the update too;
    the report names both, and the committed weights still hold exactly the budget's zeros."""
    out = tmp_path / "run"
    r = _recipe("prune.update=admm", "prune.reconstruct.steps=3", "absorption.enabled=true", "allocation.method=atp")
    plan = pipeline.preflight(r, out, False, False, "smoke-tiny")
    payload = pipeline.run(plan, Progress(len(pipeline.STAGES), quiet=True))
    report = json.loads((out / "report.json").read_text())
    assert payload["status"] == "passed" and report["allocation"]["exact"]
    assert report["pruning"]["update"] == "admm"
    assert [x["block"] for x in report["pruning"]["reconstruction"]] == list(range(TINY_CONFIG["num_hidden_layers"]))
    assert "update admm, reconstructed" in (out / "report.md").read_text()
    assert report["allocation"]["zeros"] == round(0.5 * _prunable_weights())
