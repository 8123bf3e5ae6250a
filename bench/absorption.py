"""Absorption-aware correction vs its base allocator on SmolLM2-135M, pydoc-v1 (issue 5).

For each base allocator (OWL, AlphaPruning), pruner, sparsity and calibration draw: one dense pass, the base
allocation, ONE probe that yields every definition's coefficients (drift at eps_small and eps, plus the composed pass),
then the base and every corrected allocation (definition x strength) pruned with the sequential protocol. Each is
scored on the evaluation split and on the *selection* split (the last calibration windows, disjoint from every draw):
defaults are chosen on the selection split only. Probe cost is reported in block forwards and dense-forward
equivalents (one equivalent = one forward of the whole model over the probe tokens).

    .venv/bin/python bench/absorption.py --sparsity 0.7 --pruner wanda --draws 3                  # the full grid
    .venv/bin/python bench/absorption.py --sparsity 0.6 --pruner wanda --only gain:0.05           # one setting
"""

import argparse
import json
import statistics

from common import RESULTS, Harness, realised_sparsity, recipe, table, write

from absorbdeploy import absorb, allocate, calibrate, data, probe
from absorbdeploy.allocate import ALLOCATORS
from absorbdeploy.blocks import matrix_sizes
from absorbdeploy.prune_blocks import PruneSpec, plan_counts, prune_sequential
from absorbdeploy.progress import Progress

DEFINITIONS = tuple(absorb.DEFINITIONS)
STRENGTHS = (0.02, 0.05, 0.08)


def settings(only: str | None):
    if only:
        return [(d, float(s)) for d, s in (item.split(":") for item in only.split(","))]
    return [(d, s) for d in DEFINITIONS for s in STRENGTHS]


def run_case(h: Harness, base_method: str, pruner: str, sparsity: float, draw: int, grid, selection) -> dict:
    r = recipe(allocation__method=base_method, prune__method=pruner, prune__sparsity=sparsity, calibration__draw=draw,
               absorption__enabled="true", absorption__probe_samples=8)
    h.reset()
    calib = h.calib(r)
    runner = calibrate.BlockRunner(h.lm.model, h.lm.blocks, r.calibration.batch_size)
    profile = calibrate.dense_profile(runner, calib, PruneSpec.of(r.prune).pruner.needs == "hessian",
                                      (r.absorption.probe_samples, r.absorption.probe_seqlen))
    params = [sum(s) for s in matrix_sizes(h.lm.blocks)]
    allocator, options = ALLOCATORS[base_method], getattr(r.allocation, base_method, None)
    scores = calibrate.block_scores(runner, allocator, profile.stats, options)
    base = allocate.base_allocation(base_method, scores, params, sparsity, options, r.allocation.min, r.allocation.max)
    needed = {d for d, _ in grid}
    ab, spec = r.absorption, PruneSpec.of(r.prune)
    eps = sorted({e for d in needed for e in absorb.DEFINITIONS[d].eps(ab.eps, ab.eps_small)})
    composed = any(absorb.DEFINITIONS[d].composed for d in needed)
    result = probe.probe(runner, profile, base, spec, ab, eps, composed, r.calibration.seed)
    coefficients = {d: absorb.summarise(result, d, ab.eps, ab.eps_small)["coefficients"] for d in needed}
    mode = allocator.correction
    allocations = {"base": base}
    for d, s in grid:
        allocations[f"{d}:{s}"] = absorb.correct(base, coefficients[d], params, sparsity, s, mode, r.allocation.min, r.allocation.max)
    scored = {}
    for name, alloc in allocations.items():
        h.reset()
        prune_sequential(runner, calib, plan_counts(h.lm.blocks, alloc, sparsity), spec)
        zeros, total = realised_sparsity(h.lm.blocks)
        scored[name] = {"eval_ppl": h.ppl(), "selection_ppl": h.ppl(selection), "realised": zeros / total,
                        "exact": zeros == round(sparsity * total), "allocation": alloc}
        print(f"  {base_method} {pruner} {sparsity} draw {draw} {name}: eval {scored[name]['eval_ppl']:.2f} "
              f"selection {scored[name]['selection_ppl']:.2f}", flush=True)
    n = len(params)
    return {"base_method": base_method, "pruner": pruner, "sparsity": sparsity, "draw": draw, "mode": mode,
            "coefficients": coefficients, "runs": scored,
            "probe": {"block_forwards": result["block_forwards"], "dense_forward_equivalents": result["block_forwards"] / n,
                      "seconds": result["seconds"], "tokens": result["tokens"], "eps": eps,
                      "calibration_pass_block_forwards": n}}


def summary_rows(cases: list[dict]) -> list[dict]:
    groups = {}
    for c in cases:
        for name, run in c["runs"].items():
            if name == "base":
                continue
            key = (c["base_method"], c["pruner"], c["sparsity"], name)
            base = c["runs"]["base"]
            groups.setdefault(key, []).append((run["eval_ppl"] / base["eval_ppl"] - 1, run["selection_ppl"] / base["selection_ppl"] - 1,
                                               base["eval_ppl"], run["eval_ppl"], run["exact"]))
    rows = []
    for (method, pruner, sparsity, name), values in sorted(groups.items()):
        ev = [v[0] * 100 for v in values]
        sel = [v[1] * 100 for v in values]
        rows.append({"base": method, "pruner": pruner, "sparsity": sparsity, "setting": name, "draws": len(values),
                     "base PPL": f"{statistics.fmean(v[2] for v in values):.2f}",
                     "corrected PPL": f"{statistics.fmean(v[3] for v in values):.2f}",
                     "eval change %": f"{statistics.fmean(ev):+.2f} [{min(ev):+.2f}, {max(ev):+.2f}]",
                     "selection change %": f"{statistics.fmean(sel):+.2f} [{min(sel):+.2f}, {max(sel):+.2f}]",
                     "exact": all(v[4] for v in values)})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sparsity", type=float, default=0.7)
    parser.add_argument("--pruner", default="wanda")
    parser.add_argument("--bases", default="owl,alpha")
    parser.add_argument("--draws", type=int, default=3)
    parser.add_argument("--only", default=None, help="definition:strength,... instead of the full grid")
    parser.add_argument("--eval-windows", type=int, default=16)
    parser.add_argument("--selection-windows", type=int, default=8)
    args = parser.parse_args()
    path = RESULTS / "absorption.json"
    cases = json.loads(path.read_text())["cases"] if path.exists() else []
    h = Harness(eval_windows=args.eval_windows)
    selection = data.selection_windows(h.corpus, args.selection_windows, 512)
    grid = settings(args.only)
    for base_method in args.bases.split(","):
        for draw in range(args.draws):
            key = (base_method, args.pruner, args.sparsity, draw)
            old = next((c for c in cases if (c["base_method"], c["pruner"], c["sparsity"], c["draw"]) == key), None)
            if old and all(f"{d}:{s}" in old["runs"] for d, s in grid):
                continue
            case = run_case(h, base_method, args.pruner, args.sparsity, draw, grid, selection)
            if old:
                case["runs"] = {**old["runs"], **case["runs"]}
                case["coefficients"] = {**old["coefficients"], **case["coefficients"]}
            cases = [c for c in cases if c is not old] + [case]
            write("absorption", {"dense_ppl": h.dense_ppl(), "eval_windows": args.eval_windows,
                                 "selection_windows": args.selection_windows, "cases": cases})
    rows = summary_rows(cases)
    print(table(rows, list(rows[0])))
    probe = [c["probe"] for c in cases]
    print(f"probe cost: {statistics.fmean(p['dense_forward_equivalents'] for p in probe):.1f} dense-forward equivalents over "
          f"{probe[0]['tokens']} probe tokens, {statistics.fmean(p['seconds'] for p in probe):.0f} s mean")
    print(f"written to {write('absorption', {'dense_ppl': h.dense_ppl(), 'eval_windows': args.eval_windows, 'selection_windows': args.selection_windows, 'cases': cases, 'summary': rows})}")


if __name__ == "__main__":
    main()
