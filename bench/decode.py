"""End-to-end batch-1 decode: dense vs the served-sparse `bitmask` export, loaded the standard way (issue 17).

For each model and sparsity: the model is pruned by the CLI (Wanda, uniform, `--formats bitmask`), then one process
loads the dense checkpoint (float32 and bfloat16) and the bitmask export (`import absorbdeploy` + from_pretrained,
activations float32 and bfloat16) and times greedy generation of `--new-tokens` tokens after a 16-token prompt,
all variants interleaved (rotating order) after a warm-up. Reported: decode tokens/s median [p10, p90] per variant, the
ratio of the sparse variant to the *best* dense one, resident weight bytes (all weights, and the decoder Linears alone),
peak RSS of a process that loads one variant and generates (measured in its own process), and whether the sparse
greedy tokens equal the pruned model's run densely (same weights, decoded).

With vLLM installed, the vLLM rows follow (bench/decode_vllm.py): dense vs the bitmask export through the
absorbdeploy plugin, batch 1 and 8, engine start time and resident memory.

Models: `smollm2` (the embedded SmolLM2-135M-Instruct, saved as a bf16 checkpoint first) and `tinyllama`, a random
Llama with TinyLlama-1.1B's shape (hidden 2048, 22 layers, intermediate 5632, 32 heads, 4 KV heads, vocab 32000).

    .venv/bin/python -m bench.decode                                  # both models at 50 and 70 %
    .venv/bin/python -m bench.decode --models smollm2 --sparsities 0.7 --iters 3 --new-tokens 32   # quick
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from . import decode_vllm
from .common import RESULTS, table, write

REPO = Path(__file__).resolve().parent.parent
VARIANTS = ("dense float32", "dense bfloat16", "sparse float32", "sparse bfloat16")
TINYLLAMA = dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                 num_key_value_heads=4, max_position_embeddings=2048, tie_word_embeddings=False)


def prepare(name: str, folder: Path) -> Path:
    """A dense bf16 safetensors checkpoint of the model, written once."""
    import torch

    target = folder / f"{name}-dense"
    if (target / "config.json").is_file():
        return target
    if name == "smollm2":
        from absorbdeploy.load import load
        from absorbdeploy.source import resolve_source

        lm = load(resolve_source(None), torch.device("cpu"))
        model, tokenizer = lm.model, lm.tokenizer
    else:
        from transformers import LlamaConfig, LlamaForCausalLM

        from absorbdeploy.tiny import byte_tokenizer

        torch.manual_seed(0)
        model, tokenizer = LlamaForCausalLM(LlamaConfig(**TINYLLAMA)).eval(), byte_tokenizer()
    model.to(torch.bfloat16).save_pretrained(target)
    tokenizer.save_pretrained(target)
    return target


def prune(dense: Path, sparsity: float, folder: Path, quick: bool) -> Path:
    """The CLI's run directory: bitmask/ from the CLI, and vllm/, the same pruned weights stored densely (decoded from
    bitmask/, so that the CLI's validation need not hold two vLLM engines beside a 1.1B model in memory)."""
    out = folder / f"{dense.name.removesuffix('-dense')}-{int(sparsity * 100)}"
    if not (out / "bitmask" / "config.json").is_file():
        run_cli(dense, sparsity, out, quick)
    if not (out / "vllm" / "config.json").is_file():
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from absorbdeploy import exporters

        model = AutoModelForCausalLM.from_pretrained(dense, dtype=torch.bfloat16)
        pruned = {k: v for shard in exporters.get("bitmask").tensors(out / "bitmask") for k, v in shard.items()}
        missing, unexpected = model.load_state_dict(pruned, strict=False)
        assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
        model.save_pretrained(out / "vllm")
        AutoTokenizer.from_pretrained(dense).save_pretrained(out / "vllm")
    return out


def run_cli(dense: Path, sparsity: float, out: Path, quick: bool, extra: tuple[str, ...] = ()) -> None:
    """Uniform Wanda at `sparsity` through the CLI, the bitmask format only; `extra`: more --set assignments."""
    calibration = ["calibration.nsamples=8", "calibration.seqlen=256"] if quick or "tinyllama" in dense.name else []
    sets = ["prune.method=wanda", f"prune.sparsity={sparsity}", "allocation.method=uniform", "absorption.enabled=false",
            "validate.latency.enabled=false", "validate.eval_windows=2", "validate.seqlen=256", *calibration, *extra]
    args = [sys.executable, "-m", "absorbdeploy", "prune-and-export", str(dense), "--formats", "bitmask", "--out", str(out),
            "--overwrite", "--quiet", *[a for s in sets for a in ("--set", s)]]
    start = time.perf_counter()
    proc = subprocess.run(args, capture_output=True, text=True, cwd=REPO)
    if proc.returncode != 0:
        raise SystemExit(f"pruning {dense.name} at {sparsity} failed: {proc.stderr.strip()}")
    print(f"  pruned {dense.name} to {sparsity:.0%} in {time.perf_counter() - start:.0f} s", flush=True)


def load_variant(variant: str, dense: Path, sparse: Path):
    import torch
    from transformers import AutoModelForCausalLM

    import absorbdeploy  # noqa: F401  (the bitmask format's registration)

    kind, dtype = variant.split()
    return AutoModelForCausalLM.from_pretrained(dense if kind == "dense" else sparse, dtype=getattr(torch, dtype)).eval()


def linear_bytes(model) -> int:
    """Bytes of the decoder Linears' weights as held (dense weight or packed buffers)."""
    from absorbdeploy.blocks import prunable_linears
    from absorbdeploy.sparse.linear import BitmaskLinear

    total = 0
    for block in model.model.layers:
        for module in block.modules():
            if isinstance(module, BitmaskLinear):
                total += module.packed_bytes()
        total += sum(m.weight.numel() * m.weight.element_size() for _, m in prunable_linears(block))
    return total


def time_variants(dense: Path, sparse: Path, new_tokens: int, warmup: int, iters: int) -> dict:
    import torch

    from absorbdeploy.latency import summarise
    from absorbdeploy.runners import TorchRunner
    from absorbdeploy.sparse.linear import densify, resident_weight_bytes

    models = {v: load_variant(v, dense, sparse) for v in VARIANTS}
    runners = {v: TorchRunner(m, 1) for v, m in models.items()}
    prompt = torch.randint(0, min(models["dense float32"].config.vocab_size, 256), (1, 16),
                           generator=torch.Generator().manual_seed(0))
    tokens = {v: [] for v in VARIANTS}
    for i in range(warmup + iters):
        order = VARIANTS[i % len(VARIANTS):] + VARIANTS[: i % len(VARIANTS)]
        for v in order:
            timing = runners[v].generate(prompt, new_tokens)
            if i >= warmup:
                tokens[v].append((new_tokens - 1) / timing.decode_s)
    result = {v: {"decode_tok_s": summarise(tokens[v]), "resident_weight_bytes": resident_weight_bytes(models[v]),
                  "linear_weight_bytes": linear_bytes(models[v])} for v in VARIANTS}
    for v in ("sparse float32", "sparse bfloat16"):  # the same weights decoded and run densely, in the same dtype
        reference = load_variant(v, dense, sparse)
        densify(reference)
        want = TorchRunner(reference, 1).generate(prompt, new_tokens).tokens
        got = runners[v].generate(prompt, new_tokens).tokens
        result[v]["greedy_tokens_equal"] = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), len(want))
    return result


def peak_rss(variant: str, dense: Path, sparse: Path, new_tokens: int) -> float:
    """GiB: a fresh process loads one variant and generates once; its VmHWM (ru_maxrss would carry over the parent's
    high-water mark across fork + exec)."""
    code = (f"import torch\nfrom bench import decode\n"
            f"from absorbdeploy.runners import TorchRunner\n"
            f"m = decode.load_variant({variant!r}, decode.Path({str(dense)!r}), decode.Path({str(sparse)!r}))\n"
            f"TorchRunner(m, 1).generate(torch.zeros(1, 16, dtype=torch.long), {new_tokens})\n"
            f"print(next(l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM')))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    if proc.returncode != 0:
        raise SystemExit(proc.stderr[-2000:])
    return int(proc.stdout.strip().splitlines()[-1]) / 2**20


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", default="smollm2,tinyllama")
    parser.add_argument("--sparsities", default="0.5,0.7")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--work", default="/tmp/absorbdeploy-decode-bench")
    parser.add_argument("--quick", action="store_true", help="small calibration for every model")
    parser.add_argument("--no-vllm", action="store_true", help="skip the vLLM rows")
    args = parser.parse_args()
    import torch

    from absorbdeploy.exporters import installed
    from absorbdeploy.sparse.kernels import active_path

    folder = Path(args.work)
    folder.mkdir(parents=True, exist_ok=True)
    with_vllm = not args.no_vllm and "vllm" in installed()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB per engine; three engines run side by side
    settings = {"threads": torch.get_num_threads(), "kernel_path": active_path(), "new_tokens": args.new_tokens,
                "prompt_len": 16, "warmup": args.warmup, "iters": args.iters, "vllm": with_vllm}
    previous = RESULTS / "decode.json"
    old = json.loads(previous.read_text()) if previous.exists() else {}
    cases = old.get("cases", []) if all(old.get(k) == v for k, v in settings.items()) else []
    for name in args.models.split(","):
        dense = prepare(name, folder)
        for sparsity in map(float, args.sparsities.split(",")):
            done = next((c for c in cases if c["model"] == name and c["sparsity"] == sparsity), None)
            if done is not None:  # measured in an earlier run with the same settings (bench/results/decode.json)
                if with_vllm and "greedy_fp32" not in done.get("vllm", {"greedy_fp32": 1}):
                    run = prune(dense, sparsity, folder, args.quick)
                    done["vllm"]["greedy_fp32"] = decode_vllm.greedy_fp32(run / "vllm", run / "bitmask", args.new_tokens)
                    write("decode", {**settings, "cases": cases})
                continue
            run = prune(dense, sparsity, folder, args.quick)
            sparse = run / "bitmask"
            timed = time_variants(dense, sparse, args.new_tokens, args.warmup, args.iters)
            rss = {v: peak_rss(v, dense, sparse, args.new_tokens) for v in VARIANTS}
            best = max(("dense float32", "dense bfloat16"), key=lambda v: timed[v]["decode_tok_s"]["median"])
            case = {"model": name, "sparsity": sparsity, "best_dense": best, "variants": timed, "peak_rss_gib": rss}
            print(table(torch_rows(case, args.new_tokens), list(torch_rows(case, args.new_tokens)[0])), flush=True)
            if with_vllm:
                engines = dict(zip(decode_vllm.ENGINES, (dense, run / "vllm", sparse)))
                case["vllm"] = decode_vllm.measure(engines, args.new_tokens, args.warmup, args.iters)
                case["vllm"]["greedy_fp32"] = decode_vllm.greedy_fp32(run / "vllm", sparse, args.new_tokens)
                print(table(decode_vllm.rows(name, sparsity, case["vllm"]), list(decode_vllm.rows(name, sparsity, case["vllm"])[0])), flush=True)
            cases.append(case)
            write("decode", {**settings, "load_average": list(os.getloadavg()), "cases": cases})
    rows = [row for case in cases for row in torch_rows(case, args.new_tokens)]
    print("\n" + table(rows, list(rows[0])))
    vllm_rows = [row for c in cases if "vllm" in c for row in decode_vllm.rows(c["model"], c["sparsity"], c["vllm"])]
    if vllm_rows:
        print("\n" + table(vllm_rows, list(vllm_rows[0])))
    print(f"written to {RESULTS / 'decode.json'}")


def torch_rows(case: dict, new_tokens: int) -> list[dict]:
    timed, rows = case["variants"], []
    best = timed[case["best_dense"]]["decode_tok_s"]["median"]
    for v in VARIANTS:
        t = timed[v]["decode_tok_s"]
        rows.append({"model": case["model"], "sparsity": f"{case['sparsity']:.0%}", "variant": v,
                     "tok/s median [p10, p90]": f"{t['median']:.1f} [{t['p10']:.1f}, {t['p90']:.1f}]",
                     "vs best dense": f"{t['median'] / best:.2f}x",
                     "Linear weights": f"{timed[v]['linear_weight_bytes'] / 2**20:.0f} MiB "
                                       f"({timed[v]['linear_weight_bytes'] / timed['dense bfloat16']['linear_weight_bytes']:.2f}x bf16)",
                     "all weights": f"{timed[v]['resident_weight_bytes'] / 2**20:.0f} MiB",
                     "peak RSS": f"{case['peak_rss_gib'][v]:.2f} GiB",
                     "greedy = pruned": f"{timed[v]['greedy_tokens_equal']}/{new_tokens}" if "greedy_tokens_equal" in timed[v]
                     else "-"})
    return rows


if __name__ == "__main__":
    main()
