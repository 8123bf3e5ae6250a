"""Side-by-side latency: dense and sparse runners of one runtime, timed interleaved in one run, warm-up excluded.

Each iteration times a greedy generation of `new_tokens` after a [batch, prompt_len] prompt on both runners,
alternating which goes first, so drift in machine load hits both alike. We report prefill and decode tokens/s (all
batch rows counted) as median, p10 and p90, and the sparse/dense ratio of the medians. `time_engine` first picks each
side's fastest dtype (the dense model a user would deploy is the fastest one, not the run's fp32 copy), then times each
batch size (`compare_runtime`). No number here is ever asserted in a test.
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


def probe(runner, prompt, new_tokens: int, probes: int = 3) -> float:
    """Median decode tokens/s (prefill where the runner does not time decode) of `probes` greedy generations on
    `prompt` after one untimed warm-up."""
    runner.generate(prompt, new_tokens)
    rates = []
    for _ in range(probes):
        prefill, decode = _rates(prompt, runner.generate(prompt, new_tokens))
        rates.append(prefill if decode is None else decode)
    return statistics.median(rates)


def compare_runtime(dense, sparse, prompts: dict, new_tokens: int, warmup: int, iters: int) -> dict:
    """Dense against sparse Runners of one runtime: `side_by_side` at every batch of `prompts` (batch -> [batch,
    prompt_len] token ids). The smallest batch's result is also at the top level (prefill_tok_s, decode_tok_s)."""
    by_batch = {str(b): side_by_side(dense, sparse, prompt, new_tokens, warmup, iters) for b, prompt in sorted(prompts.items())}
    return {**by_batch[str(min(prompts))], "by_batch": by_batch}


def time_engine(open_runner, sides: list[str], dtypes: list[str], live: dict, time_pair, prompt, new_tokens: int) -> dict:
    """The dense model against each sparse side of one engine, each in its fastest dtype, never holding more than
    len(sides) runners (a vLLM engine holds GiBs).

    `sides`: "dense" first, then the sparse sides' names. `dtypes`: the dtypes to try, in order (put the one `live`
    is open in first). `live`: {(side, dtype): Runner} already open; this function owns them from now on and closes
    every runner before it returns or raises. `open_runner(side, dtype)` opens another. Each dtype's runners are
    probed (`probe` on `prompt`; skipped when there is one dtype), then closed before the next dtype's open, so only a
    side whose fastest dtype is not the last one tried is reopened. `time_pair(dense, sparse)` times one pair.
    Returns {sparse side: time_pair's result + dense_dtype, sparse_dtype, probe_tok_s {"dense", "sparse"}: dtype ->
    tokens/s}."""
    probes = {side: {} for side in sides}

    def get(key):
        if key not in live:
            live[key] = open_runner(*key)
        return live[key]

    def close_except(keep: set) -> None:
        for key in [k for k in live if k not in keep]:
            live.pop(key).close()

    try:
        for dtype in dtypes:
            close_except({(side, dtype) for side in sides})
            opened = [get((side, dtype)) for side in sides]
            for runner in opened:  # every engine up before any probe: no start-up competes with a timed run
                runner.ready()
            for side, runner in zip(sides, opened):
                if len(dtypes) > 1:
                    probes[side][dtype] = probe(runner, prompt, new_tokens)
        best = {side: max(rates, key=rates.get) if rates else dtypes[0] for side, rates in probes.items()}
        results = {}
        for i, side in enumerate(sides[1:], start=1):
            close_except({("dense", best["dense"])} | {(s, best[s]) for s in sides[i:]})
            pair = [get(("dense", best["dense"])), get((side, best[side]))]
            for runner in pair:
                runner.ready()
            result = time_pair(*pair)
            results[side] = {**result, "dense_dtype": best["dense"], "sparse_dtype": best[side],
                             "probe_tok_s": {"dense": probes["dense"], "sparse": probes[side]}}
        return results
    finally:
        close_except(set())
