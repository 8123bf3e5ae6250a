"""The catalogue of bad inputs: each exits 2 with exactly one line on stderr that names the problem and the fix, prints
no traceback and creates no output directory (design §1.2, issue 8)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import run_cli

TINY = "builtin:tiny-llama"
FAST = ["--formats", "compressed-safetensors", "--set", "validate.latency.enabled=false"]


def tiny_dir(folder: Path, **config) -> Path:
    """A real tiny checkpoint on disk, optionally with config.json fields replaced."""
    from absorbdeploy.tiny import build_tiny_llama

    model, tokenizer = build_tiny_llama()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    if config:
        path = folder / "config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), **config}))
    return folder


def make(case: str, tmp: Path) -> list[str]:
    """Build the files a case needs and return its CLI arguments (the output directory is always tmp/out)."""
    out = ["--out", str(tmp / "out")]
    model_dir = tmp / "model"
    model_dir.mkdir()
    text = tmp / "text.txt"
    recipe = tmp / "recipe.yaml"
    if case == "missing model path":
        return ["prune-and-export", str(tmp / "nope"), *out]
    if case == "directory that is not a model":
        return ["prune-and-export", str(model_dir), *out]
    if case == "config.json that is not JSON":
        (model_dir / "config.json").write_text("{ not json")
        return ["prune-and-export", str(model_dir), *out]
    if case == "corrupt safetensors":
        tiny_dir(model_dir)
        (model_dir / "model.safetensors").write_bytes(b"\xff" * 64)
        return ["prune-and-export", str(model_dir), *out]
    if case == "truncated safetensors":
        tiny_dir(model_dir)
        data = (model_dir / "model.safetensors").read_bytes()
        (model_dir / "model.safetensors").write_bytes(data[: len(data) // 2])
        return ["prune-and-export", str(model_dir), *out]
    if case == "pickle-only weights":
        (model_dir / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}))
        (model_dir / "pytorch_model.bin").write_bytes(b"\x80\x04pickle")
        return ["prune-and-export", str(model_dir), *out]
    if case == "gguf that is not a model":
        (tmp / "fake.gguf").write_bytes(os.urandom(256))
        return ["prune-and-export", str(tmp / "fake.gguf"), *out]
    if case == "file that is neither a model dir nor gguf":
        text.write_text("hello")
        return ["prune-and-export", str(text), *out]
    if case == "non-causal-LM architecture":
        tiny_dir(model_dir, architectures=["LlamaModel"])
        return ["prune-and-export", str(model_dir), *out]
    if case == "unsupported model_type":
        tiny_dir(model_dir, model_type="gpt2", architectures=["GPT2LMHeadModel", "GPT2ForCausalLM"])
        return ["prune-and-export", str(model_dir), *out]
    if case == "model with no decoder blocks":
        from absorbdeploy.tiny import build_tiny_llama

        model, tokenizer = build_tiny_llama(num_hidden_layers=0)
        model.save_pretrained(model_dir)
        tokenizer.save_pretrained(model_dir)
        return ["prune-and-export", str(model_dir), *out, *FAST]
    if case == "hub id not in the offline cache":
        return ["prune-and-export", "no-such-org/no-such-model", *out]
    if case == "unknown recipe name":
        return ["prune-and-export", "--recipe", "no-such-recipe", *out]
    if case == "recipe file not found":
        return ["prune-and-export", "--recipe", str(tmp / "missing.yaml"), *out]
    recipe_texts = {
        "recipe with an unknown key": "version: 1\nprune: {sparsty: 0.5}\n",
        "recipe with a wrong type": "version: 1\ncalibration: {nsamples: many}\n",
        "recipe with a bad version": "version: 7\n",
        "recipe that is not valid YAML": "version: 1\nprune: {sparsity: [0.5\n",
        "recipe that is not a mapping": "- a\n- b\n",
    }
    if case in recipe_texts:
        recipe.write_text(recipe_texts[case])
        return ["prune-and-export", "--recipe", str(recipe), *out]
    sets = {
        "sparsity outside [0, 1)": ["prune.sparsity=1.5"],
        "N:M with N >= M": ["prune.structure=4:4"],
        "2:4 with a sparsity other than 0.5": ["prune.structure=2:4", "prune.sparsity=0.7", "allocation.method=uniform"],
        "N:M with allocation": ["prune.structure=2:4", "prune.sparsity=0.5", "allocation.method=owl"],
        "allocation min > max": ["allocation.min=0.9", "allocation.max=0.2"],
        "target outside [min, max]": ["prune.sparsity=0.5", "allocation.min=0.6", "allocation.max=0.9"],
        "set on an unknown key": ["prune.sparsty=0.5"],
        "set with an unparsable value": ["calibration.nsamples=lots"],
        "set with no equals sign": ["prune.sparsity"],
        "unknown export format in the recipe": ["export.formats=[tflite]"],
    }
    if case in sets:
        return ["prune-and-export", TINY, *out, *[a for s in sets[case] for a in ("--set", s)]]
    if case == "N:M with a dimension not divisible by M":
        return ["prune-and-export", TINY, *out, *FAST, "--set", "prune.structure=3:6", "--set", "prune.sparsity=0.5",
                "--set", "allocation.method=uniform", "--set", "absorption.enabled=false"]
    if case == "text file missing":
        return ["prune-and-export", TINY, *out, "--text", str(tmp / "none.txt")]
    if case == "text file empty":
        text.write_text("  \n")
        return ["prune-and-export", TINY, *out, "--text", str(text)]
    if case == "text file not UTF-8":
        text.write_bytes(b"\xff\xfe\x00bad" * 10)
        return ["prune-and-export", TINY, *out, "--text", str(text)]
    if case == "text too short for nsamples x seqlen":
        text.write_text("just a few words of text. " * 40)
        return ["prune-and-export", TINY, *out, *FAST, "--text", str(text)]
    if case == "evaluation text missing":
        return ["prune-and-export", TINY, *out, "--eval-text", str(tmp / "none.txt")]
    if case == "seqlen over the model's context":
        return ["prune-and-export", TINY, *out, "--set", "calibration.seqlen=4096"]
    if case == "--device cuda with no CUDA":
        return ["prune-and-export", TINY, *out, "--device", "cuda"]
    if case == "unknown format in --formats":
        return ["prune-and-export", TINY, *out, "--formats", "vllm,tflite"]
    if case == "output directory exists":
        (tmp / "out").mkdir()
        return ["prune-and-export", TINY, *out]
    if case == "output path is a file":
        (tmp / "out").write_text("x")
        return ["prune-and-export", TINY, *out]
    if case == "output directory not writable":
        return ["prune-and-export", TINY, "--out", "/proc/absorbdeploy-out"]
    if case == "unknown option":
        return ["prune-and-export", TINY, *out, "--sparsity", "0.5"]
    if case == "--seed that is not an integer":
        return ["prune-and-export", TINY, *out, "--seed", "abc"]
    if case == "validate on a directory that is not an output":
        return ["validate", str(model_dir)]
    if case == "validate on a missing directory":
        return ["validate", str(tmp / "nope")]
    raise AssertionError(case)


CASES = {  # case -> a fragment the one-line message must contain
    "missing model path": "model path not found",
    "directory that is not a model": "is not a Hugging Face model directory (no config.json)",
    "config.json that is not JSON": "is not valid JSON",
    "corrupt safetensors": "corrupt or truncated safetensors file",
    "truncated safetensors": "corrupt or truncated safetensors file",
    "pickle-only weights": "has only pickle weights",
    "gguf that is not a model": "is not a GGUF file",
    "file that is neither a model dir nor gguf": "is a file but not a .gguf",
    "non-causal-LM architecture": "is not a causal language model",
    "unsupported model_type": "model_type 'gpt2' is not supported",
    "model with no decoder blocks": "no decoder blocks",
    "hub id not in the offline cache": "not in the local Hugging Face cache",
    "unknown recipe name": "packaged recipes: ",
    "recipe file not found": "recipe file not found",
    "recipe with an unknown key": "unknown key 'prune.sparsty'",
    "recipe with a wrong type": "'calibration.nsamples' must be an integer",
    "recipe with a bad version": "unsupported version 7",
    "recipe that is not valid YAML": "is not valid YAML",
    "recipe that is not a mapping": "must be a YAML mapping",
    "sparsity outside [0, 1)": "prune.sparsity must be in [0, 1)",
    "N:M with N >= M": "need 0 < N < M",
    "2:4 with a sparsity other than 0.5": "fixes the sparsity at 0.5",
    "N:M with allocation": "needs allocation.method: uniform",
    "N:M with a dimension not divisible by M": "divisible by 6",
    "allocation min > max": "need 0 <= min < max < 1",
    "target outside [min, max]": "outside [allocation.min, allocation.max]",
    "set on an unknown key": "unknown key 'prune.sparsty'",
    "set with an unparsable value": "must be an integer, got 'lots'",
    "set with no equals sign": "expected KEY=VALUE",
    "unknown export format in the recipe": "export.formats must be one of",
    "text file missing": "calibration text not found",
    "text file empty": "is empty",
    "text file not UTF-8": "is not UTF-8 text",
    "text too short for nsamples x seqlen": "need 8 (nsamples 8",
    "evaluation text missing": "evaluation text not found",
    "seqlen over the model's context": "exceeds the model's context of 1024 tokens",
    "--device cuda with no CUDA": "no NVIDIA GPU",
    "unknown format in --formats": "export.formats must be one of",
    "output directory exists": "already exists; pass --overwrite",
    "output path is a file": "exists and is a file",
    "output directory not writable": "cannot write to",
    "unknown option": "No such option",
    "--seed that is not an integer": "Invalid value for '--seed'",
    "validate on a directory that is not an output": "is not a finished absorbdeploy output",
    "validate on a missing directory": "is not a directory",
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line_exit_two_and_writes_nothing(case, tmp_path):
    args = make(case, tmp_path)
    if case == "text too short for nsamples x seqlen":
        args += ["--recipe", "smoke-tiny"]
    existed = (tmp_path / "out").exists()
    proc = run_cli(*args, timeout=300)
    lines = [l for l in proc.stderr.splitlines() if l.strip()]
    assert proc.returncode == 2, (case, proc.stderr[-1500:])
    assert len(lines) == 1 and lines[0].startswith("error: "), (case, proc.stderr[-1500:])
    assert CASES[case] in lines[0], (case, lines[0])
    assert "Traceback" not in proc.stderr + proc.stdout
    if not existed:
        assert not (tmp_path / "out").exists(), case
    assert not (tmp_path / "out.tmp").exists(), case


def test_a_missing_runtime_is_one_line_exit_two(tmp_path):
    """onnxruntime hidden from the interpreter: asking for the onnx format names the extra to install."""
    code = ("import sys; sys.modules['onnxruntime'] = None; from absorbdeploy.cli import main; "
            f"sys.argv = ['absorbdeploy', 'prune-and-export', '{TINY}', '--out', '{tmp_path / 'out'}', '--formats', 'onnx']; main()")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    lines = [l for l in proc.stderr.splitlines() if l.strip()]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-1500:]
    assert "format 'onnx' needs onnxruntime" in lines[0] and "pip install 'absorbdeploy[onnx]'" in lines[0]
    assert not (tmp_path / "out").exists()
