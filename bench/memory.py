"""Peak memory while pruning, in memory vs streaming, as the model grows (issue 10).

Models: SmolLM2-135M saved as an fp32 safetensors directory, and random Llamas of growing size written to disk as
safetensors (about 0.8, 2.6 and 7.9 GB in fp32). Each (model, mode) runs in a fresh subprocess: load, then calibrate +
allocate + prune with uniform Wanda 50 % (sequential protocol, in streaming mode writing each pruned block to bf16
shards). Reported: peak RSS during the prune stages and over the whole process (sampled every 50 ms), wall time, and
for SmolLM2 whether both modes give bit-identical pruned weights and the streaming / in-memory time ratio.

    .venv/bin/python -m bench.memory [--sizes SmolLM2-135M,synthetic-0.8GB,...] [--models DIR]
    .venv/bin/python -m bench.memory --recheck      # recompute bit identity from the outputs a run left in --models
    .venv/bin/python -m bench.memory --sizes synthetic-7.9GB --modes on --set prune.update=admm --output memory_admm
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from .common import RESULTS, table, write

SMOLLM2 = "SmolLM2-135M"
REPO = Path(__file__).resolve().parent.parent  # the worker runs as `python -m bench.memory` from here
SYNTHETIC = {  # name -> LlamaConfig overrides (untied embeddings, vocab 32000)
    "synthetic-0.8GB": dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=10, num_attention_heads=16),
    "synthetic-2.6GB": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=10, num_attention_heads=16),
    "synthetic-7.9GB": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=36, num_attention_heads=16),
}


def make_models(folder: Path, names) -> dict[str, Path]:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from absorbdeploy import load
    from absorbdeploy.source import resolve_source

    models = {}
    smol = folder / "smollm2-fp32"
    if SMOLLM2 in names and not smol.exists():
        lm = load.load(resolve_source(None), torch.device("cpu"))
        lm.model.save_pretrained(smol)
        lm.tokenizer.save_pretrained(smol)
        del lm
    if SMOLLM2 in names:
        models[SMOLLM2] = smol
    from absorbdeploy.tiny import byte_tokenizer

    for name in (n for n in names if n != SMOLLM2):
        path = folder / name
        if not path.exists():
            config = LlamaConfig(vocab_size=32000, max_position_embeddings=2048, tie_word_embeddings=False,
                                 **SYNTHETIC[name])
            torch.manual_seed(0)
            with torch.device("cpu"):
                model = LlamaForCausalLM(config)
            model.save_pretrained(path, max_shard_size="2GB")
            byte_tokenizer().save_pretrained(path)
            del model
        models[name] = path
    return models


def worker(model_dir: str, mode: str, out: str, nsamples: int, seqlen: int, sets=()) -> None:
    """One measurement, in its own process: prints a JSON line."""
    import torch

    from absorbdeploy import export_files, load, pipeline, stream
    from absorbdeploy.source import resolve_source
    from absorbdeploy.progress import Progress, _PeakRSS
    from absorbdeploy.recipe import Recipe, override, settle

    process_peak = _PeakRSS()
    r = Recipe()
    for a in (f"calibration.nsamples={nsamples}", f"calibration.seqlen={seqlen}", "allocation.method=uniform",
              "prune.method=wanda", "prune.sparsity=0.5", "absorption.enabled=false", f"streaming.mode={mode}", "export.dtype=bfloat16",
              *sets):
        r = override(r, a)
    r = settle(r)[0]
    source = resolve_source(model_dir)
    start = time.perf_counter()
    if mode == "on":
        lm = stream.load_streaming(source, torch.device("cpu"), "bfloat16")
        lm.store.writer = export_files.ShardWriter(Path(out) / "vllm", export_files.streaming_shard_bytes(r.export.max_shard_size))
    else:
        lm = load.load(source, torch.device("cpu"))
        load.round_weights(lm.model, "bfloat16")
    loaded = time.perf_counter() - start
    from absorbdeploy import data

    corpus = data.build_corpus(lm.tokenizer, None, None)
    calib = data.calibration_windows(corpus, nsamples, seqlen)
    progress = Progress(9, quiet=True)
    outcome = pipeline.prune_model(lm, calib, r, progress)
    pruning = time.perf_counter() - start - loaded
    prune_peak = max(progress.stages[s]["peak_rss_mb"] for s in ("calibrate", "allocate", "prune"))
    peak = process_peak.stop() / 2**20  # before the in-memory path makes its bf16 copy to write the shards
    if mode == "on":
        lm.store.writer.finish()
    else:
        writer = export_files.ShardWriter(Path(out) / "vllm", export_files.parse_size("2GB"))
        writer.add(export_files.unique_state_dict(lm.model, torch.bfloat16))
        writer.finish()
    zeros = sum(r.zeros for r in outcome.records)
    print(json.dumps({"mode": mode, "load_s": loaded, "prune_s": pruning, "prune_peak_rss_mb": prune_peak,
                      "process_peak_rss_mb": peak, "zeros": zeros,
                      "block_reads": lm.store.reads if lm.store else None}))


def bit_identical(a: Path, b: Path) -> bool:
    """Every decoder-block tensor (what pruning wrote) equal bit for bit. The streaming worker writes only the blocks:
    the embeddings and final norm are added by the vllm exporter, which this measurement does not run."""
    import torch

    from absorbdeploy.stream import ShardIndex

    ia, ib = ShardIndex(a), ShardIndex(b)
    blocks = {k for k in ia.map if ".layers." in k}
    if not blocks or blocks != {k for k in ib.map if ".layers." in k}:
        return False
    return all(torch.equal(ia.read([k])[k], ib.read([k])[k]) for k in sorted(blocks))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--worker", nargs=5, metavar=("MODEL", "MODE", "OUT", "NSAMPLES", "SEQLEN"))
    parser.add_argument("--sizes", default=",".join([SMOLLM2, *SYNTHETIC]))
    parser.add_argument("--models", default="/tmp/absorbdeploy-memory-models", help="where the models are written")
    parser.add_argument("--recheck", action="store_true", help="only recompute bit identity from the kept outputs")
    parser.add_argument("--set", action="append", default=[], help="KEY=VALUE on top of uniform Wanda 50 %% (repeatable)")
    parser.add_argument("--modes", default="off,on", help="streaming modes to run")
    parser.add_argument("--output", default="memory", help="bench/results/<output>.json")
    args = parser.parse_args()
    if args.recheck:
        recheck(Path(args.models))
        return
    if args.worker:
        m, mode, out, n, t = args.worker
        worker(m, mode, out, int(n), int(t), args.set)
        return
    models = make_models(Path(args.models), [s for s in args.sizes.split(",") if s])
    rows, raw = [], []
    for name, path in models.items():
        size = sum(f.stat().st_size for f in path.glob("*.safetensors"))
        nsamples, seqlen = (32, 512) if name.startswith("SmolLM2") else (4, 128)
        results = {}
        for mode in args.modes.split(","):
            out = Path(args.models) / f"out-{name}-{mode}"
            shutil.rmtree(out, ignore_errors=True)
            env = {**os.environ, "PYTHONUNBUFFERED": "1"}
            worker_args = ["--worker", str(path), mode, str(out), str(nsamples), str(seqlen), *(f"--set={a}" for a in args.set)]
            proc = subprocess.run([sys.executable, "-m", "bench.memory", *worker_args], capture_output=True, text=True,
                                  env=env, cwd=REPO)
            if proc.returncode:
                raise SystemExit(proc.stderr[-3000:])
            results[mode] = json.loads(proc.stdout.strip().splitlines()[-1])
        same = bit_identical(Path(args.models) / f"out-{name}-off" / "vllm", Path(args.models) / f"out-{name}-on" / "vllm") \
            if len(results) == 2 else "one mode run"
        raw.append({"model": name, "weights_bytes": size, "calibration": [nsamples, seqlen], **results, "bit_identical": same})
        rows.append(display_row(raw[-1]))
        print(table(rows[-1:], list(rows[-1])), flush=True)
    finish(raw, args.output, args.set)


def display_row(run: dict) -> dict:
    none = {"prune_peak_rss_mb": float("nan"), "process_peak_rss_mb": float("nan"), "load_s": float("nan"), "prune_s": float("nan")}
    off, on = run.get("off", none), run.get("on", none)
    return {"model": run["model"], "fp32 on disk": f"{run['weights_bytes'] / 2**30:.2f} GiB",
            "in-memory peak (prune)": f"{off['prune_peak_rss_mb'] / 1024:.2f} GiB",
            "streaming peak (prune)": f"{on['prune_peak_rss_mb'] / 1024:.2f} GiB",
            "in-memory peak (process)": f"{off['process_peak_rss_mb'] / 1024:.2f} GiB",
            "streaming peak (process)": f"{on['process_peak_rss_mb'] / 1024:.2f} GiB",
            "time ratio stream/mem": f"{(on['load_s'] + on['prune_s']) / (off['load_s'] + off['prune_s']):.2f}",
            "bit-identical": run["bit_identical"]}


def finish(raw: list[dict], output: str = "memory", sets=()) -> None:
    rows = [display_row(r) for r in raw]
    print()
    print(table(rows, list(rows[0])))
    if output == "memory":
        plot(raw, RESULTS / "memory.png")
        print(f"plot: {RESULTS / 'memory.png'}")
    print(f"written to {write(output, {'sets': list(sets), 'runs': raw})}")


def recheck(models: Path) -> None:
    """Recompute the bit-identity column from the outputs a previous run left in `models`."""
    raw = json.loads((RESULTS / "memory.json").read_text())["runs"]
    for run in raw:
        off, on = (models / f"out-{run['model']}-{mode}" / "vllm" for mode in ("off", "on"))
        kept = all(any(d.glob("*.safetensors")) for d in (off, on))
        run["bit_identical"] = bit_identical(off, on) if kept else "outputs gone"
    finish(raw)


def plot(raw, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    RESULTS.mkdir(exist_ok=True)
    xs = [r["weights_bytes"] / 2**30 for r in raw]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(xs, [r["off"]["process_peak_rss_mb"] / 1024 for r in raw], "o-", label="in memory (process peak)")
    ax.plot(xs, [r["on"]["process_peak_rss_mb"] / 1024 for r in raw], "s-", label="streaming (process peak)")
    ax.plot(xs, xs, ":", color="grey", label="model size (fp32)")
    ax.set_xlabel("model weights on disk, fp32 (GiB)")
    ax.set_ylabel("peak RSS (GiB)")
    ax.set_title("peak memory while pruning")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
