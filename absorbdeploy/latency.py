"""Side-by-side latency: dense and sparse runners of one runtime, timed interleaved in one run, warm-up excluded.

Each iteration times a greedy generation of `new_tokens` after a [batch, prompt_len] prompt on both runners,
alternating which goes first, so drift in machine load hits both alike. We report prefill and decode tokens/s (all
batch rows counted) as median, p10 and p90, and the sparse/dense ratio of the medians. `compare_runtime` first picks
each side's fastest dtype (the dense model a user would deploy is the fastest one, not the run's fp32 copy), then
times each batch size. No number here is ever asserted in a test.
"""

import statistics


def _quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    position = q * (len(ordered) - 1)
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def summarise(values: list[float]) -> dict:
    return {"median": statistics.median(values), "p10": _quantile(values, 0.1), "p90": _quantile(values, 0.9), "n": len(values)}


def _rates(prompt, timing) -> tuple[float, float | None]:
    """Prefill and decode tokens/s of one generation, every batch row counted (decode None: not timed)."""
    decode = prompt.shape[0] * (timing.new_tokens - 1) / timing.decode_s if timing.decode_s else None
    return prompt.numel() / timing.prefill_s, decode


def side_by_side(dense, sparse, prompt, new_tokens: int, warmup: int, iters: int) -> dict:
    runs = {"dense": {"prefill": [], "decode": []}, "sparse": {"prefill": [], "decode": []}}
    runners = {"dense": dense, "sparse": sparse}
    for i in range(warmup + iters):
        order = ("dense", "sparse") if i % 2 == 0 else ("sparse", "dense")
        for name in order:
            timing = runners[name].generate(prompt, new_tokens)
            if i < warmup:
                continue
            prefill, decode = _rates(prompt, timing)
            runs[name]["prefill"].append(prefill)
            if decode is not None:
                runs[name]["decode"].append(decode)
    result = {"prompt_len": int(prompt.shape[1]), "batch": int(prompt.shape[0]), "new_tokens": new_tokens,
              "warmup": warmup, "iters": iters}
    for phase in ("prefill", "decode"):
        if runs["dense"][phase] and runs["sparse"][phase]:
            d, s = summarise(runs["dense"][phase]), summarise(runs["sparse"][phase])
            result[f"{phase}_tok_s"] = {"dense": d, "sparse": s, "ratio": s["median"] / d["median"]}
        else:
            result[f"{phase}_tok_s"] = None
    return result


def fastest(runners: dict, prompt, new_tokens: int, probes: int = 3) -> tuple[str, dict]:
    """The key of the runner with the highest median decode tokens/s on `prompt` (prefill where a runner has no
    decode timing) after one untimed warm-up, and every runner's median. `runners`: dtype name -> Runner; one
    runner is chosen without timing."""
    if len(runners) == 1:
        return next(iter(runners)), {}
    speeds = {}
    for dtype, runner in runners.items():
        runner.generate(prompt, new_tokens)
        rates = []
        for _ in range(probes):
            prefill, decode = _rates(prompt, runner.generate(prompt, new_tokens))
            rates.append(prefill if decode is None else decode)
        speeds[dtype] = statistics.median(rates)
    return max(speeds, key=speeds.get), speeds


def compare_runtime(dense: dict, sparse: dict, prompts: dict, new_tokens: int, warmup: int, iters: int) -> dict:
    """Dense against sparse in one runtime: each side's fastest dtype (`fastest` on the batch-1 prompt), then
    `side_by_side` at every batch of `prompts` (batch -> [batch, prompt_len] token ids). `dense`, `sparse`: dtype ->
    Runner. The batch-1 result is also at the top level (prefill_tok_s, decode_tok_s)."""
    first = prompts[min(prompts)]
    dense_dtype, dense_probe = fastest(dense, first, new_tokens)
    sparse_dtype, sparse_probe = fastest(sparse, first, new_tokens)
    by_batch = {str(b): side_by_side(dense[dense_dtype], sparse[sparse_dtype], prompt, new_tokens, warmup, iters)
                for b, prompt in sorted(prompts.items())}
    top = by_batch[str(min(prompts))]
    return {**top, "dense_dtype": dense_dtype, "sparse_dtype": sparse_dtype,
            "probe_tok_s": {"dense": dense_probe, "sparse": sparse_probe}, "by_batch": by_batch}
