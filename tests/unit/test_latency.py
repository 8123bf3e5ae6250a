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


def test_each_side_is_timed_in_its_fastest_dtype_at_every_batch():
    log = []
    dense = {"float32": Scripted("dense fp32", [1.0] * 9, [4.0] * 9, log),
             "bfloat16": Scripted("dense bf16", [1.0] * 99, [2.0] * 99, log)}
    sparse = {"float32": Scripted("sparse fp32", [1.0] * 99, [1.0] * 99, log),
              "bfloat16": Scripted("sparse bf16", [1.0] * 9, [3.0] * 9, log)}
    prompts = {1: torch.zeros(1, 4, dtype=torch.long), 8: torch.zeros(8, 4, dtype=torch.long)}
    result = latency.compare_runtime(dense, sparse, prompts, 5, warmup=0, iters=2)
    assert result["dense_dtype"] == "bfloat16" and result["sparse_dtype"] == "float32"
    assert result["probe_tok_s"]["dense"] == {"float32": 1.0, "bfloat16": 2.0}
    assert set(result["by_batch"]) == {"1", "8"} and result["by_batch"]["8"]["decode_tok_s"]["ratio"] == 2.0
    assert result["decode_tok_s"] == result["by_batch"]["1"]["decode_tok_s"]
    assert log[-8:] == ["dense bf16", "sparse fp32", "sparse fp32", "dense bf16"] * 2
