"""Does the absorption correction improve the best allocators? (issue 19; SmolLM2-135M, pydoc-v1, sequential protocol)

For each setting (pruner, sparsity, base allocator) two phases, with every choice made on the selection split (the last
8 calibration windows, disjoint from every draw) and every claim on the evaluation split (16 x 512):
- `grid`, draw 0: one dense pass, the base allocation, ONE probe per perturbation (the real pruning error at eps 0.01
  and 1 plus the composed pass; matched-norm Gaussian noise at eps 1 for `paper`), every definition's coefficients,
  then the base and every definition x strength pruned and scored. The probe's coefficients truncated at horizon h
  (each injected error followed only h blocks) come from the same curves, for the cheap-probe comparison.
- `claims`, draws 0..D-1: the base, its best correction (definition x strength with the lowest selection PPL in the
  grid) and the same correction measured by the truncated probe (`--horizon`, run for real, its cost measured).
Everything lands in bench/results/absorption_study.json (resumable: finished runs are kept); the tables are printed.

    .venv/bin/python bench/absorption.py --pruner wanda --sparsity 0.7 --bases atp,dlp
    .venv/bin/python bench/absorption.py --pruner wanda --sparsity 0.6 --bases uniform,alpha --definitions margin,paper
    .venv/bin/python bench/absorption.py --report                 # only the tables, from the JSON
"""

import argparse
import dataclasses
import json
import statistics

from common import RESULTS, Harness, realised_sparsity, recipe, table, write

from absorbdeploy import absorb, allocate, calibrate, data, probe
from absorbdeploy.allocate import ALLOCATORS
from absorbdeploy.blocks import matrix_sizes
from absorbdeploy.prune_blocks import PruneSpec, plan_counts, prune_sequential

STRENGTHS = (0.02, 0.05, 0.08, 0.12)
PATH = RESULTS / "absorption_study.json"


def setting_recipe(pruner: str, sparsity: float, base: str, draw: int):
    return recipe(allocation__method=base, prune__method=pruner, prune__sparsity=sparsity, calibration__draw=draw,
                  absorption__enabled="true")


def prepare(h: Harness, r):
    """Dense pass and base allocation for recipe `r`: (runner, calibration windows, profile, base, params)."""
    h.reset()
    calib = h.calib(r)
    spec, ab = PruneSpec.of(r.prune), r.absorption
    runner = calibrate.BlockRunner(h.lm.model, h.lm.blocks, r.calibration.batch_size)
    profile = calibrate.dense_profile(runner, calib, spec.pruner.needs == "hessian", (ab.probe_samples, ab.probe_seqlen))
    params = [sum(s) for s in matrix_sizes(h.lm.blocks)]
    allocator, options = ALLOCATORS[r.allocation.method], getattr(r.allocation, r.allocation.method, None)
    scores = calibrate.block_scores(runner, allocator, profile.stats, options)
    base = allocate.base_allocation(r.allocation.method, scores, params, r.prune.sparsity, options, r.allocation.min,
                                    r.allocation.max)
    return runner, calib, profile, base, params


def perturbation(name: str) -> str:
    """What the probe injects for a definition in this study (the recipe default, the real pruning error, unless the
    definition fixes its own)."""
    return absorb.DEFINITIONS[name].perturbation or "pruning"


def probe_coefficients(runner, profile, base, r, definitions, horizon: int | None = None):
    """The definitions' coefficients from one probe per perturbation they need; (coefficients, cost, raw results).
    With a horizon, composed is left out (it follows the whole pruned trajectory by construction)."""
    spec, ab, n = PruneSpec.of(r.prune), r.absorption, len(base)
    chosen = [d for d in definitions if horizon is None or not absorb.DEFINITIONS[d].composed]
    measured = {}
    for kind in sorted({perturbation(d) for d in chosen}):
        mine = [absorb.DEFINITIONS[d] for d in chosen if perturbation(d) == kind]
        eps = sorted({e for d in mine for e in d.eps(ab.eps, ab.eps_small)})
        settings = dataclasses.replace(ab, perturbation=kind, horizon=horizon)
        measured[kind] = probe.probe(runner, profile, base, spec, settings, eps, any(d.composed for d in mine),
                                     r.calibration.seed)
    coefficients = {d: absorb.summarise(measured[perturbation(d)], d, ab.eps, ab.eps_small)["coefficients"] for d in chosen}
    cost = {p: {"block_forwards": m["block_forwards"], "equivalents": m["block_forwards"] / n, "seconds": m["seconds"]}
            for p, m in measured.items()}
    return coefficients, cost, measured


def truncated_coefficients(measured: dict, horizon: int, ab) -> dict:
    """The coefficients a probe with this horizon would give: the same curves cut at l + horizon."""
    out = {}
    for name, d in absorb.DEFINITIONS.items():
        if d.composed:
            continue
        result = measured[perturbation(name)]
        curves = {e: [{m: {k: v for k, v in row[m].items() if k - l <= horizon} for m in row} for l, row in enumerate(rows)]
                  for e, rows in result["curves"].items()}
        out[name] = absorb.summarise({**result, "curves": curves}, name, ab.eps, ab.eps_small)["coefficients"]
    return out


def score(h: Harness, runner, calib, allocation, r, selection) -> dict:
    h.reset()
    prune_sequential(runner, calib, plan_counts(h.lm.blocks, allocation, r.prune.sparsity), PruneSpec.of(r.prune))
    zeros, total = realised_sparsity(h.lm.blocks)
    return {"eval_ppl": h.ppl(), "selection_ppl": h.ppl(selection), "exact": zeros == round(r.prune.sparsity * total),
            "allocation": allocation}


def corrected(name: str, strength: float, base, coefficients, params, r) -> list[float]:
    d = absorb.DEFINITIONS[name]
    mode = d.mode or ALLOCATORS[r.allocation.method].correction
    return absorb.correct(base, coefficients[name], params, r.prune.sparsity, strength, mode, r.allocation.min,
                          r.allocation.max, d.scaled)


def grid(h, study, key, pruner, sparsity, base_method, definitions, selection):
    case = study.setdefault("grid", {}).setdefault(key, {"runs": {}})
    r = setting_recipe(pruner, sparsity, base_method, 0)
    wanted = ["base"] + [f"{d}:{s}" for d in definitions for s in STRENGTHS]
    if all(w in case["runs"] for w in wanted):
        return case
    runner, calib, profile, base, params = prepare(h, r)
    coefficients, cost, measured = probe_coefficients(runner, profile, base, r, list(absorb.DEFINITIONS))
    truncated = {k: truncated_coefficients(measured, k, r.absorption) for k in (2, 3, 4, 6, 8)}
    case.update(coefficients=coefficients, truncated=truncated, probe_cost=cost, base=base)
    for name in wanted:
        if name not in case["runs"]:
            allocation = base if name == "base" else corrected(name.split(":")[0], float(name.split(":")[1]), base,
                                                               coefficients, params, r)
            case["runs"][name] = score(h, runner, calib, allocation, r, selection)
            print(f"  grid {key} {name}: selection {case['runs'][name]['selection_ppl']:.2f} eval "
                  f"{case['runs'][name]['eval_ppl']:.2f}", flush=True)
            write("absorption_study", study)
    return case


def best_setting(case: dict) -> str:
    return min((n for n in case["runs"] if n != "base"), key=lambda n: case["runs"][n]["selection_ppl"])


def claims(h, study, key, pruner, sparsity, base_method, draws, horizon, selection):
    best = best_setting(study["grid"][key])
    definition, strength = best.split(":")[0], float(best.split(":")[1])
    for draw in range(draws):
        entry = study.setdefault("claims", {}).setdefault(key, {}).setdefault(str(draw), {"best": best})
        if all(n in entry for n in ("base", "corrected")) and ("cheap" in entry or absorb.DEFINITIONS[definition].composed):
            continue
        r = setting_recipe(pruner, sparsity, base_method, draw)
        runner, calib, profile, base, params = prepare(h, r)
        coefficients, cost, _ = probe_coefficients(runner, profile, base, r, [definition])
        cheap, cheap_cost, _ = probe_coefficients(runner, profile, base, r, [definition], horizon)
        entry["coefficients"], entry["cheap_coefficients"] = coefficients[definition], cheap.get(definition)
        entry["probe_cost"], entry["cheap_probe_cost"] = cost, cheap_cost
        if "base" not in entry:
            entry["base"] = score(h, runner, calib, base, r, selection)
        if "corrected" not in entry:
            entry["corrected"] = score(h, runner, calib, corrected(definition, strength, base, coefficients, params, r), r,
                                       selection)
        if definition in cheap:
            entry["cheap"] = score(h, runner, calib, corrected(definition, strength, base, cheap, params, r), r, selection)
            entry["cheap"]["horizon"] = horizon
        print(f"  claims {key} draw {draw}: base {entry['base']['eval_ppl']:.2f}, {best} "
              f"{entry['corrected']['eval_ppl']:.2f}, cheap {entry.get('cheap', {}).get('eval_ppl', float('nan')):.2f}",
              flush=True)
        write("absorption_study", study)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--pruner", default="wanda")
    parser.add_argument("--sparsity", type=float, default=0.7)
    parser.add_argument("--bases", default="atp,dlp")
    parser.add_argument("--definitions", default=",".join(absorb.DEFINITIONS))
    parser.add_argument("--draws", type=int, default=3)
    parser.add_argument("--horizon", type=int, default=3, help="of the cheap probe")
    parser.add_argument("--phases", default="grid,claims")
    parser.add_argument("--report", action="store_true")
    args = parser.parse_args()
    study = json.loads(PATH.read_text()) if PATH.exists() else {}
    if not args.report:
        h = Harness(eval_windows=16)
        selection = data.selection_windows(h.corpus, 8, 512)
        study["dense_ppl"] = h.dense_ppl()
        for base_method in args.bases.split(","):
            key = f"{args.pruner} {args.sparsity} {base_method}"
            if "grid" in args.phases:
                grid(h, study, key, args.pruner, args.sparsity, base_method, args.definitions.split(","), selection)
            if "claims" in args.phases:
                claims(h, study, key, args.pruner, args.sparsity, base_method, args.draws, args.horizon, selection)
    from absorption_tables import print_tables

    print_tables(study)


if __name__ == "__main__":
    main()
