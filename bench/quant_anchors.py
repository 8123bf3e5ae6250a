"""Quantization anchors (issue 28): the pruned model against what a CPU user would deploy instead, the same DENSE model
quantized and served by the same vLLM CPU backend.

Variants (each one a directory that vLLM serves, each served by its own engine, one engine at a time):
  bf16          the dense bf16 checkpoint (bench/decode.py's `prepare`)
  w8a8          compressed-tensors `int-quantized`: int8 weights with symmetric per-output-channel scales, dynamic
                per-token int8 activations (preset "W8A8"); vLLM CPU: CPUInt8ScaledMMLinearKernel (oneDNN)
  w4a16         compressed-tensors `pack-quantized`: int4 weights, symmetric, one scale per group (preset "W4A16",
                group 128, or the largest power of two below it dividing every Linear's input size: 64 for
                SmolLM2, whose hidden size 576 is no multiple of 128, and vLLM needs whole groups); vLLM CPU: CPUWNA16
  bitmask       our served-sparse export of the uniform-Wanda-pruned model (bench/decode.py's CLI run, `bitmask/`),
                bf16 values, through the absorbdeploy plugin, one per --sparsities entry
  bitmask-int8  the same with int8 values (its own CLI run, `--set export.values=int8`, in <model>-<pct>-int8/)
  bitmask-w8a8  int8 values and int8 activations per token (`--set export.values=int8 --set export.activations=int8`,
                in <model>-<pct>-w8a8/): the sparse kernel's W8A8 path
Both quantized checkpoints are round-to-nearest from the dense bf16 weights (no calibration data, no GPTQ): written with
compressed-tensors' own API (preset scheme -> apply_quantization_config -> per-channel / per-group min-max from the
weights -> calculate_qparams -> ModelCompressor.compress_model, save_pretrained, update_config); lm_head is left bf16.

Measured per engine (vllm.LLM in absorbdeploy's worker process, bf16, enforce_eager, no prefix caching):
  decode tok/s at each --batches size: greedy generation of --new-tokens tokens (EOS ignored) after a 16-token random
    prompt per row; the time of a 1-token generation of the same prompts (the prefill) is subtracted, so the rate is
    batch x (new_tokens - 1) / decode seconds (TPOT-style; bench/decode_vllm.py's timing), median [p10, p90]
  prefill: seconds of a 1-token generation of one --prefill-len-token prompt, median
  Linear bytes / weight: bytes of every tensor of the decoder Linears in the safetensors files (weights or their
    packed parts, scales, bitmasks, row offsets, shapes), over those Linears' weight count (from the dense headers)
  PPL (models in --ppl-models; SmolLM2, a trained model): pydoc-v1 evaluation windows (validate's defaults, 16 x 512
    tokens), scored in vLLM from prompt log-probs (absorbdeploy's VllmRunner.score, what validate does for vLLM)
  linear kernel: vLLM's log line naming the quantized linear kernel it selected; for bitmask the plugin's kernel path
  greedy = bf16: how many leading tokens of 32 greedy ones after a fixed prompt equal the dense bf16 engine's
Threads: vLLM's CPU backend binds its OpenMP threads to VLLM_CPU_OMP_THREADS_BIND; its default leaves the model ONE
core of this 2-core machine, so this bench sets `0-{N-1}` unless the variable is set (VLLM_CPU_KVCACHE_SPACE: 2 GiB
unless set). Both are recorded, and the load average before and after each engine (the machine may be shared).

    .venv/bin/python -m bench.quant_anchors                          # smollm2 + tinyllama, 50 and 70 %, batch 1/8/32
    .venv/bin/python -m bench.quant_anchors --models smollm2,tinyllama@0.7  # the 1.1B shape at 70 % only
    .venv/bin/python -m bench.quant_anchors --models smollm2 --sparsities 0.5 --quick   # ~5 min (+2 to prune)
    .venv/bin/python -m bench.quant_anchors --variants bf16,w8a8,bitmask-int8
Writes bench/results/quant_anchors.json (--quick: quant_anchors-quick.json, so a smoke run keeps the real results).
"""

import argparse
import os
import re
import shutil
import time
from pathlib import Path

from . import decode
from .common import table, write

SCHEMES = {"w8a8": "W8A8", "w4a16": "W4A16"}  # compressed-tensors preset scheme names
# the recipe settings each sparse variant is exported with, and its work directory's suffix
SPARSE = {"bitmask": ((), ""), "bitmask-int8": (("export.values=int8",), "-int8"),
          "bitmask-w8a8": (("export.values=int8", "export.activations=int8"), "-w8a8")}
KERNEL_LINE = re.compile(r"(?:Selected|Using) (\w+Kernel\w*) for (\w+)")


def headers(directory: Path) -> dict:
    """Every tensor's header entry (dtype, shape, data_offsets) over the directory's safetensors files."""
    from absorbdeploy.checkpoint import read_header

    return {k: v for f in sorted(directory.glob("*.safetensors")) for k, v in read_header(f).items()
            if k != "__metadata__"}


def linear_shapes(dense: Path) -> dict[str, tuple[int, int]]:
    """The decoder Linears (module name -> (out, in)), from the dense checkpoint."""
    return {k.removesuffix(".weight"): tuple(v["shape"]) for k, v in headers(dense).items()
            if k.startswith("model.layers.") and k.endswith(".weight") and len(v["shape"]) == 2}


def linear_bytes(directory: Path, shapes: dict) -> dict:
    """Bytes of all tensors of the decoder Linears in `directory` (`<module>.<tensor>`), per weight of those Linears."""
    per_module = dict.fromkeys(shapes, 0)
    for name, info in headers(directory).items():
        module = name.rsplit(".", 1)[0]
        if module in per_module:
            per_module[module] += info["data_offsets"][1] - info["data_offsets"][0]
    missing = [m for m, b in per_module.items() if b == 0]
    assert not missing, f"{directory}: no tensors for {missing[:3]}"
    weights = sum(o * i for o, i in shapes.values())
    return {"linear_bytes": sum(per_module.values()), "linear_weights": weights,
            "bytes_per_weight": sum(per_module.values()) / weights}


def group_size(shapes: dict, preferred: int) -> int:
    """The preset's group size, halved until it divides every Linear's input size (vLLM loads whole groups only)."""
    size = preferred
    while any(i % size for _, i in shapes.values()):
        size //= 2
    return size


def quantize(dense: Path, variant: str, folder: Path) -> Path:
    """The dense bf16 checkpoint quantized round-to-nearest with compressed-tensors' preset scheme, written once."""
    import torch
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import (QuantizationConfig, QuantizationStatus, QuantizationStrategy,
                                                 apply_quantization_config, preset_name_to_scheme)
    from compressed_tensors.quantization.utils import calculate_qparams
    from transformers import AutoModelForCausalLM, AutoTokenizer

    scheme, tag = preset_name_to_scheme(SCHEMES[variant], ["Linear"]), variant
    if scheme.weights.group_size:
        size = group_size(linear_shapes(dense), scheme.weights.group_size)
        scheme.weights, tag = scheme.weights.model_copy(update={"group_size": size}), f"{variant}-g{size}"
    target = folder / f"{dense.name.removesuffix('-dense')}-{tag}"
    if (target / "config.json").is_file():
        return target
    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(dense, dtype=torch.bfloat16).eval()
    apply_quantization_config(model, QuantizationConfig(config_groups={"group_0": scheme}, ignore=["lm_head"]))
    with torch.no_grad():
        for module in model.modules():
            args = getattr(getattr(module, "quantization_scheme", None), "weights", None)
            if args is None:
                continue
            w = module.weight.float()
            if args.strategy == QuantizationStrategy.GROUP:  # [out, groups, size] -> min/max per group
                lo, hi = (t(w.unflatten(-1, (-1, args.group_size)), -1) for t in (torch.amin, torch.amax))
            else:  # CHANNEL: [out, 1]
                assert args.strategy == QuantizationStrategy.CHANNEL, args.strategy
                lo, hi = w.amin(-1, keepdim=True), w.amax(-1, keepdim=True)
            scale, zero_point = calculate_qparams(lo, hi, args)
            module.weight_scale.copy_(scale)
            if hasattr(module, "weight_zero_point"):
                module.weight_zero_point.copy_(zero_point)
            module.quantization_status = QuantizationStatus.FROZEN
    compressor = ModelCompressor.from_pretrained_model(model)
    compressor.compress_model(model)
    partial = target.with_name(target.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial)
    compressor.update_config(partial)
    AutoTokenizer.from_pretrained(dense).save_pretrained(partial)
    partial.rename(target)
    print(f"  wrote {target.name} ({compressor.quantization_config.format.value}) in {time.perf_counter() - start:.0f} s",
          flush=True)
    return target


def sparse(dense: Path, sparsity: float, variant: str, folder: Path, quick: bool) -> Path:
    """`bitmask/` of bench/decode.py's CLI run (uniform Wanda), exported with the variant's settings (SPARSE)."""
    settings, suffix = SPARSE[variant]
    out = folder / f"{dense.name.removesuffix('-dense')}-{int(sparsity * 100)}{suffix}"
    if (out / "bitmask" / "config.json").is_file():
        return out / "bitmask"
    decode.run_cli(dense, sparsity, out, quick, settings)
    return out / "bitmask"


def measure(path: Path, opts, sample, windows, sparse_engine: bool) -> dict:
    """One vLLM engine on `path`: decode rates, prefill, greedy sample, PPL, the linear kernel it runs."""
    import torch

    from absorbdeploy.compare import finite_perplexity
    from absorbdeploy.latency import summarise
    from absorbdeploy.vllm_runner import VllmRunner

    load_before = os.getloadavg()
    runner = VllmRunner(path, "bfloat16", max(opts.prefill_len, opts.seqlen, 16 + opts.new_tokens) + 64, name=path.name)
    try:
        runner.ready()
        result = {"directory": str(path), "engine_start_s": runner.startup_s, "decode_tok_s": {}}
        for batch in opts.batch_sizes:
            prompt = torch.randint(0, 256, (batch, 16), generator=torch.Generator().manual_seed(batch))
            for _ in range(opts.warmup):  # the first calls also build what an engine builds lazily (kernel plans)
                runner.generate(prompt, opts.new_tokens)
            seconds = [runner.generate(prompt, opts.new_tokens).decode_s for _ in range(opts.iters)]
            result["decode_tok_s"][str(batch)] = summarise([batch * (opts.new_tokens - 1) / s if s > 0 else float("nan")
                                                            for s in seconds])
        long = torch.randint(0, 256, (1, opts.prefill_len), generator=torch.Generator().manual_seed(1))
        prefills = [runner.generate(long, 1).prefill_s for _ in range(opts.warmup + opts.iters)]
        result["prefill_s"] = summarise(prefills[opts.warmup:])
        result["greedy_tokens"] = runner.generate(sample, 32).tokens
        if windows is not None:
            result["ppl"] = finite_perplexity(runner.score(windows).target_logprobs)
        result["engine_rss_bytes"] = runner.resident_bytes()
        lines = Path(runner.log.name).read_text(errors="replace")
        result["linear_kernel"] = sorted({f"{k} for {s}" for k, s in KERNEL_LINE.findall(lines)})
        if sparse_engine:
            result["linear_kernel"] += [f"{label}: {p}" for label, p in
                                        (runner.kernel_paths({f"b{b}": b for b in opts.batch_sizes}) or {}).items()]
    finally:
        runner.close()
    result["load_average"] = {"before": load_before, "after": os.getloadavg()}
    return result


def engines(name: str, sparsities: list[float], opts, folder: Path) -> tuple[Path, dict[str, Path]]:
    """The dense directory and every variant's directory for one model, prepared before any engine starts."""
    dense = decode.prepare(name, folder)
    paths = {}
    for variant in opts.variant_list:
        if variant == "bf16":
            paths[variant] = dense
        elif variant in SCHEMES:
            paths[variant] = quantize(dense, variant, folder)
        else:
            for sparsity in sparsities:
                paths[f"{variant} {sparsity:.0%}"] = sparse(dense, sparsity, variant, folder, opts.quick)
    return dense, paths


def run_model(name: str, sparsities: list[float], opts, folder: Path) -> dict:
    from transformers import AutoTokenizer

    from absorbdeploy import data

    dense, paths = engines(name, sparsities, opts, folder)
    tokenizer = AutoTokenizer.from_pretrained(dense)
    sample = data.tokenize("The capital of France is", tokenizer)[None]
    windows = None
    if name in opts.ppl_models.split(","):
        windows = data.eval_windows(data.build_corpus(tokenizer, None, None), opts.seqlen, opts.eval_windows)
    shapes = linear_shapes(dense)
    variants = {}
    for label, path in paths.items():
        print(f"  {name} {label}: {path}", flush=True)
        measured = measure(path, opts, sample, windows, label.startswith("bitmask"))
        variants[label] = {**linear_bytes(path, shapes), **measured}
        variants[label]["sample"] = tokenizer.decode(variants[label]["greedy_tokens"])
    reference = variants.get("bf16", {}).get("greedy_tokens")
    for v in variants.values():
        if reference is not None:
            v["greedy_equal_bf16"] = next((i for i, (a, b) in enumerate(zip(v["greedy_tokens"], reference)) if a != b),
                                          len(reference))
    return {"model": name, "ppl_windows": None if windows is None else list(windows.shape), "variants": variants}


def rows(case: dict, batches: list[int]) -> list[dict]:
    out, variants = [], case["variants"]
    base = variants.get("bf16")
    for label, v in variants.items():
        row = {"model": case["model"], "variant": label, "Linear B/weight": f"{v['bytes_per_weight']:.3f}"}
        for b in batches:
            speed = v["decode_tok_s"][str(b)]["median"]
            ratio = f" ({speed / base['decode_tok_s'][str(b)]['median']:.2f}x)" if base else ""
            row[f"tok/s b{b}"] = f"{speed:.1f}{ratio}"
        prefill = v["prefill_s"]["median"]
        ratio = f" ({base['prefill_s']['median'] / prefill:.2f}x)" if base else ""
        row["prefill ms"] = f"{prefill * 1000:.0f}{ratio}"
        row["PPL"] = f"{v['ppl']:.2f}" if v.get("ppl") is not None else "-"
        row["greedy = bf16"] = f"{v['greedy_equal_bf16']}/32" if "greedy_equal_bf16" in v else "-"
        row["linear kernel"] = "; ".join(dict.fromkeys(k.split(" for ")[0] for k in v["linear_kernel"])) or "vLLM dense"
        out.append(row)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="smollm2,tinyllama",
                        help="model names; name@0.7+0.5 gives one model its own sparsities")
    parser.add_argument("--variants", default="bf16,w8a8,w4a16,bitmask,bitmask-int8,bitmask-w8a8")
    parser.add_argument("--sparsities", default="0.5,0.7", help="for the bitmask variants")
    parser.add_argument("--batches", default=None, help="decode batch sizes (default 1,8,32; --quick 1,8)")
    parser.add_argument("--new-tokens", type=int, default=None, help="default 64; --quick 16")
    parser.add_argument("--prefill-len", type=int, default=1024)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--iters", type=int, default=None, help="default 5; --quick 2")
    parser.add_argument("--ppl-models", default="smollm2", help="models whose PPL is measured (trained weights)")
    parser.add_argument("--eval-windows", type=int, default=None, help="default validate's (16); --quick 4")
    parser.add_argument("--work", default="/tmp/absorbdeploy-decode-bench", help="shared with bench/decode.py")
    parser.add_argument("--quick", action="store_true", help="fewer tokens, iterations and windows; small calibration")
    parser.add_argument("--output", default=None,
                        help="results name (default quant_anchors, --quick quant_anchors-quick)")
    opts = parser.parse_args()
    import torch

    from absorbdeploy.recipe import Recipe

    validate = Recipe().validate
    opts.batch_sizes = [int(b) for b in (opts.batches or ("1,8" if opts.quick else "1,8,32")).split(",")]
    opts.new_tokens = opts.new_tokens or (16 if opts.quick else 64)
    opts.iters = opts.iters or (2 if opts.quick else 5)
    opts.eval_windows = opts.eval_windows or (4 if opts.quick else validate.eval_windows)
    opts.seqlen = validate.seqlen or 512
    opts.variant_list = opts.variants.split(",")
    opts.sparsity_list = [float(s) for s in opts.sparsities.split(",")]
    unknown = set(opts.variant_list) - {"bf16", *SCHEMES, *SPARSE}
    if unknown:
        parser.error(f"unknown variants {sorted(unknown)}")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"0-{os.cpu_count() - 1}")
    folder = Path(opts.work)
    folder.mkdir(parents=True, exist_ok=True)
    settings = {"threads": torch.get_num_threads(), "omp_threads_bind": os.environ["VLLM_CPU_OMP_THREADS_BIND"],
                "kv_cache_gib": os.environ["VLLM_CPU_KVCACHE_SPACE"], "batches": opts.batch_sizes,
                "new_tokens": opts.new_tokens, "prompt_len": 16, "prefill_len": opts.prefill_len, "warmup": opts.warmup,
                "iters": opts.iters, "eval_windows": opts.eval_windows, "seqlen": opts.seqlen, "quick": opts.quick,
                "ppl_runtime": "vLLM prompt_logprobs (VllmRunner.score), bf16"}
    cases, all_rows = [], []
    for spec in opts.models.split(","):
        name, _, own = spec.partition("@")
        cases.append(run_model(name, [float(v) for v in own.split("+")] if own else opts.sparsity_list, opts, folder))
        all_rows += rows(cases[-1], opts.batch_sizes)
        name = opts.output or ("quant_anchors-quick" if opts.quick else "quant_anchors")
        path = write(name, {**settings, "cases": cases})
        print(table(all_rows, list(dict.fromkeys(k for r in all_rows for k in r))), flush=True)
    print(f"written to {path}")


if __name__ == "__main__":
    main()
