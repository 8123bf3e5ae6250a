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
