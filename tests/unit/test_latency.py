"""Side-by-side latency statistics: interleaved order, warm-up excluded, medians and the ratio (no real timing)."""

import pytest
import torch

from absorbdeploy import latency
from absorbdeploy.runners import Timing


class Scripted:
    """A runner whose timings come from a list; it records the order in which it was called."""

    def __init__(self, name, prefill, decode, log):
        self.name, self.prefill, self.decode, self.log = name, list(prefill), list(decode), log

    def generate(self, prompt, new_tokens):
        self.log.append(self.name)
        return Timing(self.prefill.pop(0), self.decode.pop(0), new_tokens)


def test_quantiles_interpolate_linearly():
    values = [4.0, 1.0, 3.0, 2.0, 5.0]
    assert latency._quantile(values, 0.0) == 1.0 and latency._quantile(values, 1.0) == 5.0
    assert latency._quantile(values, 0.1) == pytest.approx(1.4)
    assert latency.summarise(values) == {"median": 3.0, "p10": pytest.approx(1.4), "p90": pytest.approx(4.6), "n": 5}


def test_runs_alternate_order_skip_warmup_and_report_tokens_per_second():
    log = []
    dense = Scripted("dense", [9.0, 1.0, 1.0, 1.0], [99.0, 2.0, 2.0, 2.0], log)
    sparse = Scripted("sparse", [9.0, 0.5, 0.5, 0.5], [99.0, 1.0, 1.0, 1.0], log)
    result = latency.side_by_side(dense, sparse, torch.zeros(1, 8, dtype=torch.long), 5, warmup=1, iters=3)
    assert log == ["dense", "sparse", "sparse", "dense", "dense", "sparse", "sparse", "dense"]
    prefill, decode = result["prefill_tok_s"], result["decode_tok_s"]
    assert prefill["dense"]["median"] == 8.0 and prefill["sparse"]["median"] == 16.0 and prefill["ratio"] == 2.0
    assert decode["dense"]["median"] == 2.0 and decode["sparse"]["median"] == 4.0 and decode["dense"]["n"] == 3


def test_a_runtime_without_decode_timing_reports_none():
    log = []
    dense = Scripted("dense", [1.0] * 3, [None] * 3, log)
    sparse = Scripted("sparse", [1.0] * 3, [None] * 3, log)
    result = latency.side_by_side(dense, sparse, torch.zeros(1, 4, dtype=torch.long), 5, warmup=0, iters=3)
    assert result["decode_tok_s"] is None and result["prefill_tok_s"]["ratio"] == 1.0


def test_prompt_rows_count_as_tokens_at_every_batch():
    log = []
    dense = Scripted("dense", [1.0, 1.0], [2.0, 2.0], log)
    sparse = Scripted("sparse", [0.5, 0.5], [1.0, 1.0], log)
    result = latency.side_by_side(dense, sparse, torch.zeros(8, 4, dtype=torch.long), 5, warmup=0, iters=1)
    assert result["batch"] == 8 and result["prefill_tok_s"]["dense"]["median"] == 32.0  # 8 rows x 4 tokens in 1 s
    assert result["decode_tok_s"]["sparse"]["median"] == 32.0  # 8 rows x 4 new tokens after the first, in 1 s


def test_every_batch_is_timed_and_the_smallest_is_also_on_top():
    log = []
    dense = Scripted("dense", [1.0] * 4, [2.0] * 4, log)
    sparse = Scripted("sparse", [1.0] * 4, [1.0] * 4, log)
    prompts = {8: torch.zeros(8, 4, dtype=torch.long), 1: torch.zeros(1, 4, dtype=torch.long)}
    result = latency.compare_runtime(dense, sparse, prompts, 5, warmup=0, iters=2)
    assert set(result["by_batch"]) == {"1", "8"} and result["by_batch"]["8"]["decode_tok_s"]["ratio"] == 2.0
    assert result["decode_tok_s"] == result["by_batch"]["1"]["decode_tok_s"] and result["batch"] == 1


class Engine:
    """A runner that decodes at a fixed rate and records being opened, readied and closed in `world`."""

    def __init__(self, side, dtype, rate, world):
        self.name, self.rate, self.world, self.closed, self.readied = f"{side} {dtype}", rate, world, False, False
        world["opened"].append(self.name)
        world["open"] += 1
        world["peak"] = max(world["peak"], world["open"])

    def ready(self):
        self.readied = True

    def generate(self, prompt, new_tokens):
        assert self.readied and not self.closed, self.name
        return Timing(1.0, prompt.shape[0] * (new_tokens - 1) / self.rate, new_tokens)

    def close(self):
        if not self.closed:
            self.closed, self.world["open"] = True, self.world["open"] - 1


RATES = {("dense", "float32"): 1.0, ("dense", "bfloat16"): 2.0, ("a", "float32"): 3.0, ("a", "bfloat16"): 1.0,
         ("b", "float32"): 1.0, ("b", "bfloat16"): 5.0}


def engine_world():
    world = {"opened": [], "open": 0, "peak": 0}
    live = {(side, "float32"): Engine(side, "float32", RATES[side, "float32"], world) for side in ("dense", "a", "b")}
    return world, live


def test_each_side_runs_in_its_fastest_dtype_with_at_most_one_runner_per_side_open():
    world, live = engine_world()
    pairs = []
    results = latency.time_engine(lambda side, dtype: Engine(side, dtype, RATES[side, dtype], world), ["dense", "a", "b"],
                                  ["float32", "bfloat16"], live, lambda d, s: pairs.append((d.name, s.name)) or {"x": 1},
                                  torch.zeros(1, 4, dtype=torch.long), 5)
    assert pairs == [("dense bfloat16", "a float32"), ("dense bfloat16", "b bfloat16")]
    assert results["a"]["dense_dtype"] == "bfloat16" and results["a"]["sparse_dtype"] == "float32"
    assert results["b"]["sparse_dtype"] == "bfloat16" and results["b"]["x"] == 1
    assert results["a"]["probe_tok_s"] == {"dense": {"float32": 1.0, "bfloat16": 2.0}, "sparse": {"float32": 3.0, "bfloat16": 1.0}}
    assert world["peak"] == 3 and world["open"] == 0  # one dtype's engines at a time; all closed at the end
    assert world["opened"].count("a float32") == 2  # closed for bfloat16's probe, reopened as a's fastest


def test_one_dtype_is_not_probed_and_a_failure_closes_every_runner():
    world, live = engine_world()
    results = latency.time_engine(None, ["dense", "a"], ["float32"], dict(live), lambda d, s: {}, torch.zeros(1, 4, dtype=torch.long), 5)
    assert results["a"]["probe_tok_s"] == {"dense": {}, "sparse": {}}
    assert world["open"] == 0 and len(world["opened"]) == 3  # everything handed over is closed, nothing reopened

    def broken(side, dtype):
        raise RuntimeError("no KV cache")

    world, live = engine_world()
    with pytest.raises(RuntimeError, match="no KV cache"):
        latency.time_engine(broken, ["dense", "a", "b"], ["float32", "bfloat16"], live, lambda d, s: {},
                            torch.zeros(1, 4, dtype=torch.long), 5)
    assert world["open"] == 0
