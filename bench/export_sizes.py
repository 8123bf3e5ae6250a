"""Bytes on disk per format vs dense, reload time in each runtime, and max |delta logit| after the round trip, for
SmolLM2-135M at 50 / 70 / 90 % unstructured and 2:4 (issue 6).

Pruning is Wanda from one dense statistics pass (the sizes depend only on where the zeros are); weights are rounded to
bf16 (export dtype) as the pipeline does, ONNX is fp32. The reference is the in-memory pruned model; vLLM is compared
on next-token log-probs (it exposes no logits), the others on full logits, over 2 x 512 evaluation tokens.

    .venv/bin/python -m bench.export_sizes [--sparsities 0.5,0.7,0.9,2:4]
"""

import argparse
import shutil
import tempfile
import time
from pathlib import Path

from .common import Harness, recipe, table, write

from absorbdeploy import exporters
from absorbdeploy.blocks import prunable_names
from absorbdeploy.load import round_weights
from absorbdeploy.recipe import parse_nm
from absorbdeploy.runners import TorchRunner


def measure(h: Harness, fmt: str, folder: Path, spec, windows) -> dict:
    module = exporters.get(fmt)
    artefact = module.export(h.lm.model, h.lm.tokenizer, folder / fmt, spec)
    start = time.perf_counter()
    with module.load(artefact.path, exporters.RuntimeOptions()) as runner:
        runner.ready()
        load_s = time.perf_counter() - start
        reference = TorchRunner(h.lm.model)
        if runner.exposes_logits:
            diff = float((runner.logits(windows) - reference.logits(windows)).abs().max())
        else:
            diff = float((runner.score(windows).target_logprobs - reference.score(windows).target_logprobs).abs().max())
    audit = module.describe(artefact.path)["audit"]
    return {"bytes": artefact.bytes, "load_s": load_s, "max_abs_diff": diff, "diff_of": "logits" if runner.exposes_logits else "logprobs",
            "realised": audit["sparsity"], "export_s": artefact.seconds}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sparsities", default="0.5,0.7,0.9,2:4")
    args = parser.parse_args()
    h = Harness(eval_windows=2)
    windows = h.evals
    formats = exporters.installed()
    rows, raw = [], []
    with tempfile.TemporaryDirectory(prefix="absorbdeploy-sizes-") as tmp:
        for setting in ["dense", *args.sparsities.split(",")]:
            h.reset()
            if setting != "dense":
                structure = setting if ":" in setting else "unstructured"
                sparsity = 0.5 if ":" in setting else float(setting)
                r = recipe(prune__sparsity=sparsity, prune__structure=structure, allocation__method="uniform",
                           calibration__statistics="dense", allocation__min=0.0, allocation__max=0.99)
                h.run(r, eval_windows=windows[:1])
            round_weights(h.lm.model, "bfloat16")
            nm = parse_nm(setting) if ":" in setting else None
            names = prunable_names(h.lm.model, h.lm.blocks)
            row = {"setting": setting}
            for fmt in formats:
                folder = Path(tmp) / setting.replace(":", "of")
                spec = exporters.spec_for(fmt, recipe(export__dtype="bfloat16").export, names, nm)
                result = measure(h, fmt, folder, spec, windows)
                raw.append({"setting": setting, "format": fmt, **result})
                row[fmt] = result
                shutil.rmtree(folder / fmt, ignore_errors=True)
            rows.append(row)
            dense = rows[0]
            print(f"{setting}: " + ", ".join(f"{f} {row[f]['bytes'] / 2**20:.1f} MiB ({row[f]['bytes'] / dense[f]['bytes']:.2f}x), "
                                            f"load {row[f]['load_s']:.1f} s, max diff {row[f]['max_abs_diff']:.1e}" for f in formats), flush=True)
    table_rows = []
    for row in rows:
        for fmt in formats:
            r = row[fmt]
            table_rows.append({"setting": row["setting"], "format": fmt, "MiB": f"{r['bytes'] / 2**20:.1f}",
                               "vs dense": f"{r['bytes'] / rows[0][fmt]['bytes']:.3f}x", "realised": f"{r['realised']:.4f}",
                               "export s": f"{r['export_s']:.1f}", "load s": f"{r['load_s']:.1f}",
                               "max |diff|": f"{r['max_abs_diff']:.1e} ({r['diff_of']})"})
    print()
    print(table(table_rows, list(table_rows[0])))
    print(f"written to {write('export_sizes', {'runs': raw})}")


if __name__ == "__main__":
    main()
