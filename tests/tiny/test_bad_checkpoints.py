"""Checkpoints a run must refuse before any work (exit 2, one line, nothing written), each fault kind with several
inputs: config/checkpoint disagreements, quantized sources, non-finite or unrepresentable weights, outputs that overlap
inputs, incomplete sharded checkpoints (in memory and streaming), ambiguous settings."""

import json
import os

import pytest
import torch

from tests.conftest import run_cli
from tests.helpers import assert_refused, tiny_checkpoint

FAST = ["--recipe", "smoke-tiny", "--formats", "compressed-safetensors"]


def _set(name, value):
    return lambda state: state.__setitem__(name, value)


def _poke(name, index, value):
    def edit(state):
        state[name][index] = value
    return edit


CHECKPOINTS = {  # case -> (tiny_checkpoint keyword arguments, fragment of the one-line error)
    "untied lm_head missing": (dict(edit=lambda s: s.pop("lm_head.weight")), "lm_head.weight is missing"),
    "a block tensor missing": (dict(edit=lambda s: s.pop("model.layers.1.mlp.down_proj.weight")),
                               "model.layers.1.mlp.down_proj.weight is missing"),
    "tied config, distinct lm_head stored": (dict(tie=True, edit=_set("lm_head.weight", torch.randn(258, 128))),
                                             "stores a different lm_head.weight"),
    "extra block on disk": (dict(edit=_set("model.layers.2.mlp.up_proj.weight", torch.randn(256, 128))),
                            "model.layers.2.mlp.up_proj.weight is on disk but the config has no such tensor"),
    "tensor of the wrong shape": (dict(edit=_set("model.layers.0.mlp.up_proj.weight", torch.randn(255, 128))),
                                  "has shape [255, 128] on disk but the config implies [256, 128]"),
    "config says fewer heads": (dict(config={"num_key_value_heads": 2}), "model.layers.0.self_attn.k_proj.weight has shape"),
    "AWQ quantization_config": (dict(config={"quantization_config": {"quant_method": "awq", "bits": 4, "group_size": 128,
                                                                      "version": "gemm", "zero_point": True}}),
                                "quant_method 'awq' (bits 4, group_size 128)"),
    "GPTQ quantization_config": (dict(config={"quantization_config": {"quant_method": "gptq", "bits": 8}}), "quant_method 'gptq'"),
    "bitsandbytes quantization_config": (dict(config={"quantization_config": {"quant_method": "bitsandbytes"}}),
                                         "quant_method 'bitsandbytes'"),
    "quantized compressed-tensors": (dict(config={"quantization_config": {
        "quant_method": "compressed-tensors", "config_groups": {"group_0": {"weights": {"num_bits": 8}}}}}),
        "compressed-tensors with quantized weights"),
    "NaN in q_proj": (dict(edit=_poke("model.layers.0.self_attn.q_proj.weight", (0, 0), float("nan"))),
                      "model.layers.0.self_attn.q_proj.weight holds 1 NaN"),
    "+inf in down_proj": (dict(edit=_poke("model.layers.1.mlp.down_proj.weight", (1, 1), float("inf"))),
                          "model.layers.1.mlp.down_proj.weight holds 0 NaN and 1 infinite"),
    "NaN in a norm": (dict(edit=_poke("model.norm.weight", 3, float("nan"))), "model.norm.weight holds 1 NaN"),
}


@pytest.mark.parametrize("mode", ["off", "on"])
@pytest.mark.parametrize("case", list(CHECKPOINTS))
def test_bad_checkpoint_is_refused_before_any_work(case, mode, tmp_path):
    kwargs, fragment = CHECKPOINTS[case]
    model = tiny_checkpoint(tmp_path / "model", **kwargs)
    out = tmp_path / "out"
    proc = run_cli("prune-and-export", model, *FAST, "--out", out, "--set", f"streaming.mode={mode}")
    assert_refused(proc, fragment, out)


@pytest.mark.parametrize("mode", ["off", "on"])
def test_a_shard_the_index_names_must_exist(mode, tmp_path):
    model = tiny_checkpoint(tmp_path / "model", shard="200KB")
    victim = sorted(model.glob("model-*.safetensors"))[1]
    victim.unlink()
    out = tmp_path / "out"
    proc = run_cli("prune-and-export", model, *FAST, "--out", out, "--set", f"streaming.mode={mode}")
    assert_refused(proc, f"to {victim.name}, which is missing", out)


def test_a_value_beyond_the_export_dtype_is_refused(tmp_path):
    model = tiny_checkpoint(tmp_path / "model", edit=_poke("model.layers.0.mlp.up_proj.weight", (0, 0), 1e6))
    out = tmp_path / "out"
    proc = run_cli("prune-and-export", model, *FAST, "--out", out, "--set", "export.dtype=float16")
    assert_refused(proc, "holds |w| up to 1e+06, beyond float16's range", out)


def test_output_may_not_overlap_an_input(tmp_path):
    model = tiny_checkpoint(tmp_path / "model")
    text = tmp_path / "texts" / "calib.txt"
    text.parent.mkdir()
    text.write_text("some calibration text. " * 4000)
    os.symlink(model, tmp_path / "link")
    cases = [
        (model, ["--overwrite"], "is the input"),
        (model / "out", [], "lies inside the input"),
        (tmp_path, ["--overwrite"], "contains the input"),
        (text.parent, ["--overwrite", "--text", text], "contains the input"),
        (tmp_path / "link" / "sub", [], "lies inside the input"),
    ]
    before = sorted(p.name for p in model.iterdir())
    for out, extra, fragment in cases:
        proc = run_cli("prune-and-export", model, *FAST, "--out", out, *extra)
        assert_refused(proc, fragment)
    assert sorted(p.name for p in model.iterdir()) == before and text.is_file()
    proc = run_cli("prune-and-export", tmp_path / "link", *FAST, "--out", model, "--overwrite")
    assert_refused(proc, "is the input")


@pytest.mark.parametrize("args, fragment", [
    (["--text", "null"], "calibration text not found: null"),
    (["--text", "true"], "calibration text not found: true"),
    (["--text", "x.txt", "--set", "calibration.text=y.txt"], "calibration.text is set twice (--text and --set"),
    (["--set", "prune.sparsity=0.3", "--set", "prune.sparsity=0.4"], "prune.sparsity is set twice"),
    (["--set", "prune={sparsity: 0.3}", "--set", "prune.sparsity=0.4"], "prune.sparsity is set twice"),
    (["--formats", " , "], "--formats is empty"),
])
def test_ambiguous_settings_are_refused(args, fragment, tmp_path):
    out = tmp_path / "out"
    proc = run_cli("prune-and-export", "builtin:tiny-llama", "--recipe", "smoke-tiny", "--out", out, *args)
    assert_refused(proc, fragment, out)


def test_a_recipe_with_a_duplicate_key_is_refused(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("version: 1\nprune: {sparsity: 0.5}\nprune: {method: magnitude}\n")
    proc = run_cli("prune-and-export", "builtin:tiny-llama", "--recipe", recipe, "--out", tmp_path / "out")
    assert_refused(proc, "key 'prune' appears twice", tmp_path / "out")


@pytest.mark.parametrize("formats, limit", [("compressed-safetensors", 300_000), ("onnx", 1_000_000)])
def test_a_full_disk_mid_run_is_one_line_and_leaves_nothing(formats, limit, tmp_path):
    """RLIMIT_FSIZE makes every write past `limit` bytes fail with EFBIG, as a full disk fails with ENOSPC."""
    import resource
    import signal
    import subprocess
    import sys

    def cap():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    model = tiny_checkpoint(tmp_path / "model")
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "absorbdeploy", "prune-and-export", str(model), "--recipe", "smoke-tiny",
                           "--formats", formats, "--out", str(out)], capture_output=True, text=True, preexec_fn=cap,
                          timeout=300)
    assert_refused(proc, "I/O error", out)
    assert "File too large" in proc.stderr


def test_an_internal_error_exits_3_with_the_traceback_in_a_file(tmp_path):
    import subprocess
    import sys

    code = ("import sys; import absorbdeploy.pipeline as p\n"
            "def boom(*a, **k): raise RuntimeError('planted bug')\n"
            "p.prune_model = boom\n"
            "from absorbdeploy.cli import main\n"
            f"sys.argv = ['absorbdeploy', 'prune-and-export', 'builtin:tiny-llama', '--recipe', 'smoke-tiny', '--out', "
            f"'{tmp_path / 'out'}']\nmain()")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    line = assert_refused(proc, "internal error: RuntimeError: planted bug; traceback in ", tmp_path / "out", code=3)
    saved = line.rsplit("traceback in ", 1)[1].strip()
    assert "Traceback" in open(saved).read() and "planted bug" in open(saved).read()
    os.unlink(saved)


def test_a_float16_checkpoint_is_exported_as_float16_and_says_so(tmp_path):
    from safetensors import safe_open

    model = tiny_checkpoint(tmp_path / "model", dtype="float16")
    out = tmp_path / "out"
    proc = run_cli("prune-and-export", model, *FAST, "--out", out)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "rounded to" not in proc.stdout
    report = json.loads((out / "report.json").read_text())
    assert report["model"]["dtype"]["source"] == "float16" and report["model"]["dtype"]["export"] == "float16"
    assert report["model"]["dtype"]["rounding"]["changed"] == 0
    sidecar = json.loads((out / "compressed-safetensors" / "absorbdeploy.json").read_text())
    assert sidecar["dtype"] == "float16" and sidecar["source_dtype"] == "float16"
    with safe_open(str(out / "compressed-safetensors" / "model.safetensors"), "pt") as f:
        assert f.get_tensor("model.embed_tokens.weight").dtype == torch.float16
    proc = run_cli("prune-and-export", model, *FAST, "--out", tmp_path / "bf", "--set", "export.dtype=bfloat16")
    assert proc.returncode == 0 and "note: float16 weights rounded to bfloat16 for export" in proc.stdout


def test_a_compressed_safetensors_export_is_accepted_as_input(tmp_path):
    first, second = tmp_path / "first", tmp_path / "second"
    assert run_cli("prune-and-export", "builtin:tiny-llama", *FAST, "--out", first).returncode == 0
    for mode, out in (("off", second), ("on", tmp_path / "streamed")):
        proc = run_cli("prune-and-export", first / "compressed-safetensors", *FAST, "--out", out,
                       "--set", "prune.sparsity=0.6", "--set", f"streaming.mode={mode}")
        assert proc.returncode == 0, proc.stderr[-2000:]
        report = json.loads((out / "report.json").read_text())
        assert report["model"]["dtype"]["source"] == "bfloat16" and report["allocation"]["exact"]
        assert report["allocation"]["realised"] == pytest.approx(0.6, abs=1e-5)


def test_a_format_that_cannot_store_the_export_dtype_is_refused_or_left_out(tmp_path):
    proc = run_cli("prune-and-export", "builtin:tiny-llama", "--recipe", "smoke-tiny", "--formats", "bitmask",
                   "--set", "export.dtype=float32", "--out", tmp_path / "out")
    assert_refused(proc, "format 'bitmask' stores bfloat16 or float16 weights, not float32", tmp_path / "out")
    from absorbdeploy import exporters
    from absorbdeploy.pipeline import preflight
    from absorbdeploy.recipe import Recipe, override

    plan = preflight(override(Recipe(), "export.dtype=float32"), tmp_path / "x", False, False, "defaults")
    assert "bitmask" not in plan.formats and any("leaves out bitmask" in n for n in plan.notes)
    assert set(plan.formats) == set(exporters.installed()) - {"bitmask"}


@pytest.mark.parametrize("mode", ["off", "on"])
def test_dense_weights_under_a_sparsity_only_compressed_tensors_config_load_as_dense(mode, tmp_path):
    """Such configs (no config_groups, dense format) made transformers' compressed-tensors quantizer crash (exit 3)."""
    sparsity_only = {"quant_method": "compressed-tensors", "format": "dense", "config_groups": None,
                     "sparsity_config": {"format": "dense", "global_sparsity": 0.0, "targets": ["Linear"]}}
    model = tiny_checkpoint(tmp_path / "model", config={"quantization_config": sparsity_only})
    proc = run_cli("prune-and-export", model, *FAST, "--out", tmp_path / "out", "--set", f"streaming.mode={mode}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["allocation"]["realised"] == pytest.approx(0.5, abs=1e-5)
