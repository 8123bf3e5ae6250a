"""Renderings of report.json: number formatting, one artefact row per runtime (a failed reload says why), latency rows,
the Markdown sections that appear only when their data exists, and the terminal table."""

import copy
import io

import pytest
from rich.console import Console

from absorbdeploy import render

OK = {"runtime": "vllm", "ppl": 12.5, "dense_ppl": 10.0, "ppl_ratio": 1.25, "top1_agreement": 0.99875,
      "max_abs_logit_diff": None, "max_abs_logprob_diff": 2.5e-5, "bytes": 3 * 2**20, "bytes_ratio": 0.5,
      "resident_weight_bytes": 2**20, "dense_resident_weight_bytes": 4 * 2**20, "realised_sparsity": 0.5}
REPORT = {
    "model": {"name": "builtin:tiny-llama"}, "status": "failed", "exit_code": 1, "failed_gates": ["max_ppl_ratio"],
    "environment": {"device": "cpu", "cpu": "x86_64", "torch_threads": 2, "packages": {"torch": "2.9", "transformers": "5.16"}},
    "recipe": {"origin": "smoke-tiny", "absorption": {"enabled": False, "definition": "margin"}},
    "pruning": {"method": "wanda", "structure": "unstructured", "statistics": "sequential"},
    "allocation": {"method": "uniform", "target": 0.5, "realised": 0.5, "zeros": 1234567, "weights": 2469134, "exact": True,
                   "blocks": [{"block": 0, "params": 1000, "score": None, "absorption_coeff": None, "base_sparsity": 0.5,
                               "final_sparsity": 0.5, "realised_sparsity": 0.5}]},
    "protocol": {"name": "pydoc-v1", "calibration_windows": "8 x 128", "eval_windows": "4 x 128", "eval_text": "pydoc"},
    "dense": {"ppl": 10.0}, "reference": {"ppl": 12.5, "what": "in memory"},
    "artefacts": {"vllm": OK, "onnx": {"runtime": "onnxruntime", "error": "RuntimeError: no such op"}},
    "runtimes": {},
    "gates": [{"gate": "max_ppl_ratio", "artefact": "vllm", "value": 1.25, "limit": 1.1, "passed": False}],
    "stages": {"load": {"seconds": 1.26, "peak_rss_mb": 300.4}},
}


@pytest.mark.parametrize("value, digits, shown", [
    (None, 3, "–"), (0.5, 3, "0.500"), (0.5, 1, "0.5"), (0.0, 3, "0.000"), (1e-4, 3, "1.00e-04"),
    (123456.0, 3, "1.23e+05"), (99999.0, 1, "99999.0"), (7, 3, "7"), ("x", 3, "x"),
])
def test_numbers_are_shown_fixed_or_scientific_by_magnitude(value, digits, shown):
    assert render._f(value, digits) == shown


def test_artefact_rows_one_per_artefact_and_failures_say_why():
    rows = render.artefact_rows(REPORT)
    assert all(len(r) == len(render.ARTEFACT_HEADER) for r in rows)
    assert rows[0] == ["vllm", "vllm", "yes", "12.500", "10.000", "1.250", "0.9988", "2.50e-05 (logprob)",
                       "3.0 MiB (0.50x dense)", "1.0 MiB (0.25x dense)", "0.500000"]
    assert rows[1][:3] == ["onnx", "onnxruntime", "FAILED: RuntimeError: no such op"]
    logits = {**OK, "max_abs_logit_diff": 0.0, "resident_weight_bytes": None, "bytes_ratio": None}
    row = render.artefact_rows({"artefacts": {"torch": logits}})[0]
    assert row[7] == "0.000 (logit)" and row[8] == "3.0 MiB" and row[9] == "dense (zeros stored)"


def test_latency_rows_show_each_batch_dtype_spread_path_and_a_missing_decode_graph():
    timing = {"dense": {"median": 100.0, "p10": 90.0, "p90": 110.0}, "sparse": {"median": 50.0, "p10": 45.04, "p90": 55.0},
              "ratio": 0.5}
    faster = {**timing, "ratio": 2.0}
    kernel = {"prefill_tok_s": timing, "decode_tok_s": faster, "dense_dtype": "bfloat16", "sparse_dtype": "bfloat16",
              "by_batch": {"1": {"prefill_tok_s": timing, "decode_tok_s": faster},
                           "8": {"prefill_tok_s": timing, "decode_tok_s": timing}},
              "kernel_paths": {"decode b1": "avx512 fused (64x96)", "prefill b8": "avx512 amx (64x96)"}}
    report = {"runtimes": {"torch + bitmask kernel": {"latency": kernel},
                           "onnxruntime": {"latency": {"prefill_tok_s": timing, "decode_tok_s": None}},
                           "vllm": {"dense_ppl": 1.0}}}
    rows = render.latency_rows(report)
    assert rows[0] == ["torch + bitmask kernel", "1", "prefill", "100.0 [90.0, 110.0] bfloat16",
                       "50.0 [45.0, 55.0] bfloat16", "0.500", "–"]
    assert rows[1][5:] == ["2.000", "avx512 fused (64x96)"] and rows[2][6] == "avx512 amx (64x96)"
    assert [r[:3] for r in rows] == [["torch + bitmask kernel", "1", "prefill"], ["torch + bitmask kernel", "1", "decode"],
                                     ["torch + bitmask kernel", "8", "prefill"], ["torch + bitmask kernel", "8", "decode"],
                                     ["onnxruntime", "1", "prefill"], ["onnxruntime", "1", "decode"]]
    assert rows[5][5] == "n/a (no KV-cache graph)" and rows[4][3].endswith(" ?")


def test_markdown_sections_follow_the_report():
    text = render.markdown(REPORT)
    assert text.startswith("# absorbdeploy report: builtin:tiny-llama\n")
    assert "**FAILED** (exit code 1): failed gates: max_ppl_ratio" in text
    assert "absorption off" in text and "(1,234,567 of 2,469,134 weights; exact: True)" in text
    assert "| vllm | vllm | yes | 12.500 |" in text and "| onnx | onnxruntime | FAILED: RuntimeError: no such op |" in text
    assert "| max_ppl_ratio | vllm | 1.25000 | 1.10000 | **NO** |" in text
    assert "| load | 1.3 | 300 |" in text
    assert "## Latency" not in text and "## Absorption correction" not in text and "Zero-shot" not in text
    with_more = copy.deepcopy(REPORT)
    with_more["runtimes"] = {"torch": {"latency": {"prefill_tok_s": {"dense": {"median": 1.0, "p10": 1.0, "p90": 1.0},
                                                                     "sparse": {"median": 1.0, "p10": 1.0, "p90": 1.0},
                                                                     "ratio": 1.0}}}}
    with_more["zero_shot"] = {"status": "skipped", "reason": "lm_eval is not installed"}
    text = render.markdown(with_more)
    assert "## Latency" in text and "Zero-shot accuracy: skipped (lm_eval is not installed)." in text


def test_print_summary_draws_the_artefact_table():
    console = Console(file=io.StringIO(), width=250, force_terminal=False)
    render.print_summary(REPORT, console)
    out = console.file.getvalue()
    assert "absorbdeploy: builtin:tiny-llama" in out and "FAILED: RuntimeError: no such op" in out
    assert "latency" not in out  # no runtime was timed
