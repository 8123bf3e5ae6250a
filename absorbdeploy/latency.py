"""Side-by-side latency: dense and sparse runners of one runtime, timed interleaved in one run, warm-up excluded.

Each iteration times a greedy generation of `new_tokens` after a `prompt_len` prompt on both runners, alternating which
goes first, so drift in machine load hits both alike. We report prefill and decode tokens/s as median, p10 and p90, and
the sparse/dense ratio of the medians. No number here is ever asserted in a test.
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


def side_by_side(dense, sparse, prompt, new_tokens: int, warmup: int, iters: int) -> dict:
    runs = {"dense": {"prefill": [], "decode": []}, "sparse": {"prefill": [], "decode": []}}
    runners = {"dense": dense, "sparse": sparse}
    for i in range(warmup + iters):
        order = ("dense", "sparse") if i % 2 == 0 else ("sparse", "dense")
        for name in order:
            timing = runners[name].generate(prompt, new_tokens)
            if i < warmup:
                continue
            runs[name]["prefill"].append(prompt.shape[1] / timing.prefill_s)
            if timing.decode_s:
                runs[name]["decode"].append((timing.new_tokens - 1) / timing.decode_s)
    result = {"prompt_len": int(prompt.shape[1]), "new_tokens": new_tokens, "warmup": warmup, "iters": iters}
    for phase in ("prefill", "decode"):
        if runs["dense"][phase] and runs["sparse"][phase]:
            d, s = summarise(runs["dense"][phase]), summarise(runs["sparse"][phase])
            result[f"{phase}_tok_s"] = {"dense": d, "sparse": s, "ratio": s["median"] / d["median"]}
        else:
            result[f"{phase}_tok_s"] = None
    return result
