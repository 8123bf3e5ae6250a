"""How long calibrate + allocate + prune takes, as a ratio to one dense forward over the same calibration tokens (issue 4).

Everything is measured in this one process, side by side: one full dense forward of SmolLM2 over 32 x 512 tokens
(micro-batches of 8), then OWL + Wanda with the anchors' sequential protocol (dense pass for the OWL scores, then the
sequential prune pass), the single-pass dense-statistics variant, and the anchors' per-sample loop (batch size 1).
Target: sequential OWL + Wanda <= 3x one dense forward. Peak RSS per stage from the pipeline's own stage clock.

    .venv/bin/python -m bench.prune_speed [--repeats 1]
"""

import argparse
import resource
import time

import torch

from .common import Harness, recipe, table, write


def dense_forward_seconds(h: Harness, windows, batch: int = 8) -> float:
    h.reset()
    start = time.perf_counter()
    with torch.no_grad():
        for chunk in windows.split(batch):
            h.lm.model(input_ids=chunk, use_cache=False)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    h = Harness(eval_windows=4)
    variants = {
        "OWL+Wanda, sequential statistics (default)": recipe(allocation__method="owl", prune__sparsity=0.7),
        "OWL+Wanda dense statistics": recipe(allocation__method="owl", prune__sparsity=0.7, calibration__statistics="dense"),
        "OWL+Wanda batch 1 (anchors' loop)": recipe(allocation__method="owl", prune__sparsity=0.7, calibration__batch_size=1),
    }
    windows = h.calib(variants["OWL+Wanda, sequential statistics (default)"])
    rows, raw = [], []
    for _ in range(args.repeats):
        forward = dense_forward_seconds(h, windows)
        raw.append({"dense_forward_s": forward})
        for name, r in variants.items():
            h.profiles.clear()  # every variant pays for its own dense pass
            result = h.run(r, eval_windows=h.evals)
            work = sum(result["stages"][s] for s in ("calibrate", "allocate", "absorb", "prune"))
            peak_mb = max(result["peak_rss_mb"].values())
            raw[-1][name] = {"seconds": work, "stages": result["stages"], "peak_rss_mb": result["peak_rss_mb"],
                             "ppl": result["ppl"]}
            rows.append({"variant": name, "seconds": f"{work:.1f}", "dense forward s": f"{forward:.1f}",
                         "ratio": f"{work / forward:.2f}x", "peak RSS GiB": f"{peak_mb / 1024:.2f}",
                         "PPL (4 windows)": f"{result['ppl']:.2f}"})
    process_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    print(table(rows, list(rows[0])))
    print(f"process peak RSS: {process_peak / 2**30:.2f} GiB (includes the dense copy the harness keeps for resets)")
    print(f"written to {write('prune_speed', {'runs': raw, 'process_peak_rss_bytes': process_peak})}")


if __name__ == "__main__":
    main()
