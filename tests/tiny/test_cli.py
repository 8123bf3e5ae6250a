"""The CLI end to end on the tiny model, in a subprocess, exactly as users and CI run it."""

import json
from pathlib import Path

import pytest
import torch
import yaml

from absorbdeploy import export_files, exporters
from tests.conftest import run_cli

INSTALLED = exporters.installed()  # smoke-tiny writes every installed format
VLLM = "vllm" in INSTALLED
needs_vllm = pytest.mark.skipif(not VLLM, reason="vllm not installed")
# What the README promises, written out here rather than read from the exporters: each format is scored in its own
# runtime, and bitmask/ also in vLLM through the plugin.
ARTEFACTS = set(INSTALLED) | ({"bitmask (vllm + bitmask plugin)"} if VLLM else set())
TIMED_RUNTIMES = {"torch", "torch + bitmask kernel"} | ({"vllm", "vllm + bitmask plugin"} if VLLM else set()) | \
                 ({"onnxruntime"} if "onnx" in INSTALLED else set())
FILES = {"vllm": ["vllm/config.json", "vllm/absorbdeploy.json"], "bitmask": ["bitmask/config.json"],
         "compressed-safetensors": ["compressed-safetensors/config.json"], "onnx": ["onnx/model.onnx"]}


@pytest.fixture(scope="module")
def smoke(tmp_path_factory) -> tuple[Path, object]:
    out = tmp_path_factory.mktemp("smoke") / "run"
    proc = run_cli("prune-and-export", "--recipe", "smoke-tiny", "--out", out, "--set", "validate.latency.enabled=true")
    return out, proc


def test_smoke_tiny_exits_zero_and_writes_every_artefact(smoke):
    out, proc = smoke
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"output: {out}" in proc.stdout
    for name in ("recipe.resolved.yaml", "allocation.csv", "report.json", "report.md", *(f for fmt in INSTALLED
                                                                                          for f in FILES[fmt])):
        assert (out / name).is_file(), name
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == sorted(INSTALLED)
    assert not Path(str(out) + ".tmp").exists()
    resolved = yaml.safe_load((out / "recipe.resolved.yaml").read_text())
    assert resolved["model"] == "builtin:tiny-llama" and resolved["prune"]["sparsity"] == 0.5


def test_smoke_realised_sparsity_read_back_from_disk_is_exact(smoke):
    out, _ = smoke
    fmt = "compressed-safetensors"  # needs no runtime: always written
    prunable = export_files.read_sidecar(out / fmt)["prunable"]
    tensors = {k: v for shard in exporters.get(fmt).tensors(out / fmt) for k, v in shard.items() if k in prunable}
    zeros = sum(int((t == 0).sum()) for t in tensors.values())
    total = sum(t.numel() for t in tensors.values())
    assert len(tensors) == 4 * 7 and zeros == round(0.5 * total)
    report = json.loads((out / "report.json").read_text())
    assert report["allocation"]["exact"] and report["allocation"]["zeros"] == zeros
    for fmt, art in report["artefacts"].items():
        assert art["realised_sparsity"] == zeros / total, fmt


def test_smoke_report_compares_every_artefact(smoke):
    out, _ = smoke
    report = json.loads((out / "report.json").read_text())
    assert report["status"] == "passed" and report["exit_code"] == 0
    assert set(report["artefacts"]) == ARTEFACTS
    for fmt, art in report["artefacts"].items():
        assert art["top1_agreement"] == 1.0, fmt
        assert art["ppl"] == pytest.approx(report["reference"]["ppl"], rel=1e-4), fmt
    assert report["artefacts"]["compressed-safetensors"]["max_abs_logit_diff"] == 0.0
    assert {g["gate"] for g in report["gates"]} == {"max_abs_logit_diff", "min_top1_agreement"}
    assert set(report["stages"]) >= {"load", "data", "calibrate", "allocate", "prune", "export", "validate"}
    assert "| compressed-safetensors | torch (decoded) | yes |" in (out / "report.md").read_text()
    assert ("| vllm | vllm | yes |" in (out / "report.md").read_text()) == VLLM


def test_smoke_times_dense_and_pruned_side_by_side_in_every_runtime(smoke):
    out, _ = smoke
    runtimes = json.loads((out / "report.json").read_text())["runtimes"]
    assert set(runtimes) == TIMED_RUNTIMES
    for runtime, entry in runtimes.items():
        phases = ["prefill_tok_s"] + (["decode_tok_s"] if runtime != "onnxruntime" else [])
        for phase in phases:
            timing = entry["latency"][phase]
            assert timing["dense"]["n"] == timing["sparse"]["n"] == 3, (runtime, phase)
            assert timing["dense"]["median"] > 0 and timing["sparse"]["median"] > 0, (runtime, phase)
            assert timing["ratio"] == pytest.approx(timing["sparse"]["median"] / timing["dense"]["median"]), (runtime, phase)
    if "onnxruntime" in runtimes:
        assert runtimes["onnxruntime"]["latency"]["decode_tok_s"] is None  # no KV-cache graph
    assert "## Latency (dense and sparse interleaved" in (out / "report.md").read_text()
    for runtime in ("torch + bitmask kernel", "vllm + bitmask plugin"):
        if runtime not in runtimes:
            continue
        lat = runtimes[runtime]["latency"]
        assert set(lat["by_batch"]) == {"1", "8"} and lat["by_batch"]["8"]["batch"] == 8
        # each side ran in the fastest of the two dtypes it was probed in
        for side in ("dense", "sparse"):
            probed = lat["probe_tok_s"][side]
            assert set(probed) == {"float32", "bfloat16"} and lat[f"{side}_dtype"] == max(probed, key=probed.get)
        assert set(lat["kernel_paths"]) == {"prefill b1", "decode b1", "prefill b8", "decode b8"}
        assert all(path.split(" (")[0].split()[-1] in ("fused", "amx") or " tiled/" in path
                   for path in lat["kernel_paths"].values()), lat["kernel_paths"]


@needs_vllm
def test_smoke_measures_the_weights_each_vllm_engine_holds(smoke):
    out, _ = smoke
    artefacts = json.loads((out / "report.json").read_text())["artefacts"]
    plugin, dense_vllm = artefacts["bitmask (vllm + bitmask plugin)"], artefacts["vllm"]
    assert plugin["resident_weight_bytes"] < plugin["dense_resident_weight_bytes"]  # only the packed tensors
    assert dense_vllm["resident_weight_bytes"] == dense_vllm["dense_resident_weight_bytes"]  # zeros stored


@needs_vllm
def test_vllm_export_loads_in_transformers_with_the_pruned_weights(smoke):
    from transformers import AutoModelForCausalLM

    out, _ = smoke
    model = AutoModelForCausalLM.from_pretrained(out / "vllm", dtype=torch.float32)
    config = json.loads((out / "vllm" / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == "bfloat16"
    zeros = sum(int((m.weight == 0).sum()) for layer in model.model.layers for m in layer.modules() if isinstance(m, torch.nn.Linear))
    assert zeros == json.loads((out / "report.json").read_text())["allocation"]["zeros"]


def test_unknown_recipe_is_one_line_exit_two_and_writes_nothing(tmp_path):
    out = tmp_path / "never"
    proc = run_cli("prune-and-export", "--recipe", "no-such-recipe", "--out", out)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "smoke-tiny" in lines[0] and "uniform-wanda-50" in lines[0]
    assert "Traceback" not in proc.stderr and not out.exists() and not Path(str(out) + ".tmp").exists()


def test_existing_output_directory_needs_overwrite(tmp_path):
    out = tmp_path / "exists"
    out.mkdir()
    proc = run_cli("prune-and-export", "--recipe", "smoke-tiny", "--out", out)
    assert proc.returncode == 2 and "--overwrite" in proc.stderr


def test_report_json_follows_its_schema_and_plots_are_written(smoke):
    from importlib import resources

    import jsonschema

    out, _ = smoke
    schema = json.loads(resources.files("absorbdeploy").joinpath("report.schema.json").read_text())
    jsonschema.validate(json.loads((out / "report.json").read_text()), schema)
    for plot in ("allocation.png", "ppl_ratio.png"):
        data = (out / plot).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000, plot


def test_validate_dir_reproduces_the_report(smoke):
    out, _ = smoke
    before = json.loads((out / "report.json").read_text())
    proc = run_cli("validate", out, "--quiet")
    assert proc.returncode == 0, proc.stderr[-2000:]
    after = json.loads((out / "report.json").read_text())
    assert after["revalidated"] and after["status"] == before["status"] == "passed"
    for fmt, art in before["artefacts"].items():
        assert after["artefacts"][fmt]["ppl"] == pytest.approx(art["ppl"], rel=1e-6), fmt
        assert after["artefacts"][fmt]["top1_agreement"] == art["top1_agreement"]
        assert after["artefacts"][fmt]["realised_sparsity"] == art["realised_sparsity"]
    assert [(g["gate"], g["artefact"], g["passed"]) for g in after["gates"]] == \
           [(g["gate"], g["artefact"], g["passed"]) for g in before["gates"]]


def test_validate_refuses_a_damaged_bitmask_export_with_one_line(smoke, tmp_path):
    import shutil

    from tests.tiny.sparse.test_directory import DAMAGE, damaged

    out, _ = smoke
    copy = tmp_path / "run"
    shutil.copytree(out, copy, ignore=shutil.ignore_patterns("bitmask"))
    tensors, quantization, message = DAMAGE["a row with one more bit than its values"]
    damaged(out / "bitmask", copy / "bitmask", tensors, quantization)
    before = (copy / "report.json").read_text()
    proc = run_cli("validate", copy, "--quiet")
    assert proc.returncode == 2 and proc.stderr.startswith("error: ") and message in proc.stderr, proc.stderr
    assert (copy / "report.json").read_text() == before


def test_an_impossible_gate_exits_one_and_names_the_gate(tmp_path):
    out = tmp_path / "gated"
    proc = run_cli("prune-and-export", "--recipe", "smoke-tiny", "--out", out, "--formats", "compressed-safetensors",
                   "--set", "validate.gates.max_ppl_ratio=0.5", "--set", "validate.latency.enabled=false")
    assert proc.returncode == 1, proc.stderr[-2000:]
    failing = [l for l in proc.stderr.splitlines() if l.startswith("gate failed:")]
    assert len(failing) == 1 and "max_ppl_ratio on compressed-safetensors" in failing[0] and "limit 0.5" in failing[0]
    report = json.loads((out / "report.json").read_text())  # artefacts and report are kept
    assert report["status"] == "failed" and report["exit_code"] == 1 and (out / "compressed-safetensors" / "config.json").is_file()


def test_int8_values_are_exact_against_their_decoded_weights_and_gated_on_their_ppl(tmp_path):
    """export.values=int8: the bitmask artefact agrees with the pruned model whose weights are what int8 stores (top-1
    1.0, logits to fp32 rounding) in transformers and in vLLM, reports its bytes per weight, and the quantization
    gate compares its PPL with the unquantized pruned model's."""
    out = tmp_path / "run"
    proc = run_cli("prune-and-export", "--recipe", "smoke-tiny", "--out", out, "--set", "export.values=int8",
                   "--set", "export.formats=[bitmask]")
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    names = ["bitmask"] + (["bitmask (vllm + bitmask plugin)"] if VLLM else [])
    for name in names:
        artefact = report["artefacts"][name]
        assert artefact["values"] == "int8" and artefact["top1_agreement"] == 1.0
        assert artefact["max_abs_logprob_diff"] < 1e-4 and artefact["realised_sparsity"] == 0.5
        assert artefact["unquantized_ppl"] == report["reference"]["ppl"] != artefact["ppl"]
        assert artefact["quantization_ppl_ratio"] == artefact["ppl"] / artefact["unquantized_ppl"]
        assert 0.6 < artefact["linear_bytes_per_weight"] < 0.75  # 0.5 values + 0.125 bitmask + offsets and scales
    gates = {(g["gate"], g["artefact"]) for g in report["gates"]}
    assert all(("max_quantization_ppl_ratio", name) in gates for name in names)
    config = json.loads((out / "bitmask" / "config.json").read_text())["quantization_config"]
    assert config["values_dtype"] == "int8" and config["scale_layout"] == "per-channel"


def test_w8a8_is_gated_on_its_reference_ppl_and_runs_the_integer_kernel_in_both_runtimes(tmp_path):
    """export.activations=int8 (W8A8): config.json declares int8-per-token activations, transformers and vLLM both run
    the kernel's W8A8 path, and since per-token rounding makes logits chaotic the artefact is gated on its PPL against
    the reference whose Linears also quantize their inputs (w8a8_ppl_tolerance), not on logits or top-1."""
    out = tmp_path / "run"
    proc = run_cli("prune-and-export", "--recipe", "smoke-tiny", "--out", out, "--set", "export.values=int8",
                   "--set", "export.activations=int8", "--set", "export.formats=[bitmask]")
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    names = ["bitmask"] + (["bitmask (vllm + bitmask plugin)"] if VLLM else [])
    gates = {(g["gate"], g["artefact"]): g for g in report["gates"]}
    for name in names:
        artefact = report["artefacts"][name]
        assert artefact["values"] == "int8" and artefact["activations"] == "int8-per-token"
        assert artefact["reference_ppl"] not in (None, artefact["unquantized_ppl"])
        assert gates[("w8a8_ppl_tolerance", name)]["value"] == abs(artefact["ppl"] / artefact["reference_ppl"] - 1)
        assert gates[("w8a8_ppl_tolerance", name)]["passed"]
        assert ("max_abs_logit_diff", name) not in gates and ("min_top1_agreement", name) not in gates
        assert artefact["top1_agreement"] is not None  # reported, not gated
    config = json.loads((out / "bitmask" / "config.json").read_text())["quantization_config"]
    assert config["input_activations"] == "int8-per-token"
