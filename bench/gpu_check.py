"""The CUDA path, checked in one go on a lent GPU machine (issue 20); `bench/gpu_check.sh` installs and calls this.

What runs (each step's outcome lands in one JSON, `--out`/gpu_check.json, also when a step fails):
1. `reference`: the same two recipes as the committed CPU run (bench/results/gpu_check_cpu.json), uniform Wanda 50 %
   and the default recipe (margin absorption), pruned by the CLI from the carried tiny trained Llama with
   `--device cuda`: stage times, dense and pruned PPL, gates, and the CUDA masks' agreement with the CPU masks (the CPU
   run's compressed export, carried beside the fixture), matrix by matrix.
2. `speed`: a random Llama of SmolLM2-135M's shape, uniform Wanda 50 %, pruned on the machine's CPU and on CUDA, stage
   times side by side (timing only: nothing compares its numbers).
   Every format is validated by the pipeline itself in each runtime it has there (onnxruntime on its best provider;
   vLLM, CUDA build, when the image has it): PPL and agreement per artefact land in the JSON.
3. `runtimes`: whether onnxruntime has the CUDA execution provider and whether vLLM is importable, and a session of the
   ONNX export on the best provider.

SmolLM2 itself does not travel: its GGUF (98 MB) is over the device tool's 64 MiB transfer limit and the machine
reaches no registry, hence the carried tiny trained model for the comparisons.

    .venv/bin/python -m bench.gpu_check --prepare                 # CPU machine: fixture, CPU reference, committed JSON
    python3 -m bench.gpu_check --device cuda --out "$OUT"          # the GPU machine (through gpu_check.sh)
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
FIXTURE = Path(os.environ.get("ABSORBDEPLOY_GPU_CHECK_FIXTURE") or REPO / ".gpu_check")  # ignored by git; carried
CPU_SUMMARY = Path(os.environ.get("ABSORBDEPLOY_GPU_CHECK_CPU")
                   or Path(__file__).resolve().parent / "results" / "gpu_check_cpu.json")
RECIPES = {"uniform-wanda-50": ["--recipe", "uniform-wanda-50"], "default": []}
SMALL = ["--set", "calibration.nsamples=16", "--set", "calibration.seqlen=128", "--set", "validate.seqlen=128",
         "--set", "validate.eval_windows=8", "--set", "validate.latency.enabled=false"]
SMOLLM2_SHAPE = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                     num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192, tie_word_embeddings=True)


def cli(*args, timeout=600) -> tuple[int, str, float]:
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "absorbdeploy", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout)
    return proc.returncode, (proc.stderr.strip().splitlines() or [""])[-1], time.perf_counter() - start


def prepare() -> None:
    """On the CPU machine: the tiny trained fixture, the CPU run of each recipe (kept beside it for the mask
    comparison), and the committed summary bench/results/gpu_check_cpu.json."""
    from tests.helpers import train_tiny

    model_dir = FIXTURE / "tiny-trained"
    if not (model_dir / "config.json").is_file():
        model, tokenizer = train_tiny(steps=300)
        model.save_pretrained(model_dir)
        tokenizer.save_pretrained(model_dir)
    summary = {"device": "cpu", "model": "tiny trained Llama (tests/helpers.train_tiny, 300 steps)", "runs": {}}
    for name, recipe in RECIPES.items():
        out = FIXTURE / "cpu" / name
        code, line, seconds = cli("prune-and-export", model_dir, *recipe, *SMALL, "--formats", "compressed-safetensors",
                                  "--device", "cpu", "--out", out, "--overwrite")
        if code != 0:
            raise SystemExit(f"CPU reference {name} failed ({code}): {line}")
        summary["runs"][name] = summarise(out, seconds)
    CPU_SUMMARY.write_text(json.dumps(summary, indent=1))
    print(f"fixture and CPU reference in {FIXTURE}; summary {CPU_SUMMARY}")


def summarise(out: Path, seconds: float) -> dict:
    report = json.loads((out / "report.json").read_text())
    return {"exit_code": report["exit_code"], "dense_ppl": report["dense"]["ppl"], "pruned_ppl": report["reference"]["ppl"],
            "realised": report["allocation"]["realised"], "failed_gates": report["failed_gates"],
            "stages": {k: v["seconds"] for k, v in report["stages"].items()}, "wall_seconds": seconds,
            "device": report["environment"]["device"],
            "artefacts": {name: {k: a.get(k) for k in ("ppl", "ppl_ratio", "top1_agreement", "runtime", "error")}
                          for name, a in report["artefacts"].items()}}


def mask_agreement(mine: Path, reference: Path) -> dict:
    """Per pruned matrix, the fraction of weights whose pruned/kept state matches (both compressed exports decoded)."""
    import torch

    from absorbdeploy import export_files, exporters

    module = exporters.get("compressed-safetensors")
    prunable = set(export_files.read_sidecar(reference)["prunable"])

    def masks(folder):
        return {k: v == 0 for shard in module.tensors(folder) for k, v in shard.items() if k in prunable}

    a, b = masks(mine), masks(reference)
    per = {k: float((a[k] == b[k]).float().mean()) for k in sorted(prunable)}
    return {"min": min(per.values()), "mean": sum(per.values()) / len(per), "matrices": len(per),
            "identical_matrices": sum(torch.equal(a[k], b[k]) for k in per),
            "weights_differing": int(sum(int((a[k] != b[k]).sum()) for k in per))}


def reference_runs(device: str, out: Path) -> dict:
    committed = json.loads(CPU_SUMMARY.read_text())
    results = {}
    import importlib.util

    # every format, each validated in every runtime it has here: onnxruntime on its best provider, vLLM (CUDA or CPU)
    formats = "compressed-safetensors,onnx,bitmask" + (",vllm" if importlib.util.find_spec("vllm") else "")
    for name, recipe in RECIPES.items():
        run = out / f"run-{name}"
        code, line, seconds = cli("prune-and-export", FIXTURE / "tiny-trained", *recipe, *SMALL, "--formats", formats,
                                  "--device", device, "--out", run, "--overwrite")
        entry = {"exit_code": code, "last_stderr_line": line}
        if (run / "report.json").is_file():
            entry.update(summarise(run, seconds))
            cpu = committed["runs"][name]
            entry["cpu"] = {"pruned_ppl": cpu["pruned_ppl"], "dense_ppl": cpu["dense_ppl"], "stages": cpu["stages"]}
            entry["pruned_ppl_vs_cpu"] = entry["pruned_ppl"] / cpu["pruned_ppl"]
            entry["masks_vs_cpu"] = mask_agreement(run / "compressed-safetensors", FIXTURE / "cpu" / name / "compressed-safetensors")
        results[name] = entry
    return results


def speed_runs(devices: list[str], out: Path) -> dict:
    """A random Llama of SmolLM2's shape, uniform Wanda 50 %, on each device: stage seconds side by side."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from absorbdeploy.tiny import byte_tokenizer

    model_dir = out / "smollm2-shaped"
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**SMOLLM2_SHAPE)).to(torch.bfloat16).save_pretrained(model_dir)
    byte_tokenizer().save_pretrained(model_dir)
    results = {}
    for device in devices:
        run = out / f"speed-{device}"
        code, line, seconds = cli("prune-and-export", model_dir, "--recipe", "uniform-wanda-50", "--formats",
                                  "compressed-safetensors", "--device", device, "--set", "validate.latency.enabled=false",
                                  "--set", "validate.eval_windows=4", "--out", run, "--overwrite")
        results[device] = {"exit_code": code, "last_stderr_line": line, "wall_seconds": seconds}
        if (run / "report.json").is_file():
            report = json.loads((run / "report.json").read_text())
            results[device]["stages"] = {k: v["seconds"] for k, v in report["stages"].items()}
            results[device]["peak_cuda_mb"] = max((v.get("peak_cuda_mb", 0) for v in report["stages"].values()), default=0)
    return results


def runtimes(out: Path) -> dict:
    import importlib.util

    found = {"vllm_importable": importlib.util.find_spec("vllm") is not None}
    try:
        import onnxruntime as ort

        found["onnxruntime"] = ort.__version__
        found["onnxruntime_providers"] = ort.get_available_providers()
        model = out / "run-uniform-wanda-50" / "onnx" / "model.onnx"
        if model.is_file():
            providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in found["onnxruntime_providers"]]
            session = ort.InferenceSession(str(model), providers=providers)  # as exporters/onnx.py chooses
            found["onnx_session_provider"] = session.get_providers()[0]
    except Exception as e:  # a missing or broken runtime is a finding, not a crash of the check
        found["onnxruntime_error"] = f"{type(e).__name__}: {e}"
    return found


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--out", default=os.environ.get("OUT") or "/tmp/absorbdeploy-gpu-check")
    parser.add_argument("--prepare", action="store_true", help="CPU machine: fixture + CPU reference + committed JSON")
    parser.add_argument("--skip-speed", action="store_true", help="leave out the SmolLM2-shaped timing runs")
    args = parser.parse_args()
    if args.prepare:
        return prepare()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    import torch

    result = {"device": args.device, "torch": torch.__version__, "cuda": torch.cuda.get_device_name(0)
              if torch.cuda.is_available() else None, "cpu_threads": torch.get_num_threads()}
    steps = {"reference": lambda: reference_runs(args.device, out),
             "speed": lambda: speed_runs(["cpu", args.device] if args.device != "cpu" else ["cpu"], out),
             "runtimes": lambda: runtimes(out)}
    for name, step in steps.items():
        if name == "speed" and args.skip_speed:
            continue
        start = time.perf_counter()
        try:
            result[name] = step()
        except Exception as e:
            result[name] = {"error": f"{type(e).__name__}: {e}"}
        result[f"{name}_seconds"] = round(time.perf_counter() - start, 1)
        (out / "gpu_check.json").write_text(json.dumps(result, indent=1, default=str))
        print(f"{name}: done in {result[f'{name}_seconds']} s", flush=True)
    print(json.dumps(result, indent=1, default=str))


if __name__ == "__main__":
    main()
