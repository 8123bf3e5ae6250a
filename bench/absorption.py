"""Does the absorption correction improve the best allocators? (issue 19; SmolLM2-135M, pydoc-v1, sequential protocol)

For each setting (pruner, sparsity, base allocator), with every choice made on the selection split (the last 8
calibration windows, disjoint from every draw) and every claim on the evaluation split (16 x 512):
- `grid`, draw 0: one dense pass, the base allocation, ONE probe per perturbation the definitions need (the real
  pruning error at eps 0.01 and 1, the composed pass; matched-norm Gaussian noise at eps 1 for `paper`), their
  coefficients, then the base and every definition x strength pruned and scored (no definitions: the base alone).
  The coefficients a probe truncated at horizon h (each error followed only h blocks) would give come from the same
  curves.
- `tokens`, draw 0: the fewer-tokens probe, each of the P probe samples alone (1/P of the cost): its coefficients
  against the full probe's, the PPL of the correction it gives, and the check that the mean of the parts is the full.
- `claims`, draws 0..D-1: the base, its best correction (definition x strength with the lowest selection PPL in the
  grid), the same correction from the probe truncated at `--horizon` (run for real, its cost measured) and from
  injections every `--stride` blocks interpolated in depth. Draw 0 reuses the grid's runs.
Everything lands in bench/results/absorption_study.json (resumable: finished runs are kept, a grid given more
definitions probes only the new ones, and claims whose grid pick changed are redone; two processes, one per core with
OMP_NUM_THREADS=1, may run different settings side by side); the tables are printed. The JSON on record came from
(each prefixed by `OMP_NUM_THREADS=1 .venv/bin/python -m bench.absorption`):

    --pruner wanda --sparsity 0.7 --bases atp --definitions gain,composed,margin,paper --phases grid
    --pruner wanda --sparsity 0.7 --bases atp --definitions gain,margin,paper --phases tokens
    --pruner wanda --sparsity 0.7 --bases atp --phases claims --horizon 3 --stride 5
    --pruner wanda --sparsity 0.7 --bases dlp --definitions gain,composed,margin,paper --phases grid
    --pruner wanda --sparsity 0.7 --bases dlp --phases claims --horizon 0 --stride 5
    --pruner wanda --sparsity 0.6 --bases uniform --definitions margin --phases grid,claims --horizon 0 --stride 0
    --pruner wanda --sparsity 0.6 --bases atp,alpha,dlp --definitions margin,paper --phases grid,claims --horizon 0 --stride 5
    --pruner wanda --sparsity 0.6 --bases owl --definitions '' --phases grid
    --pruner wanda --sparsity 0.5 --bases uniform --definitions margin --phases grid,claims --horizon 0 --stride 5
    --pruner sparsegpt --sparsity 0.7 --bases atp --definitions margin --phases grid,claims --horizon 0 --stride 5
    --pruner sparsegpt --sparsity 0.7 --bases atp --definitions margin,paper --phases grid   # after the claims
    --pruner sparsegpt --sparsity 0.7 --bases owl --definitions margin --phases grid,claims --horizon 0 --stride 0
    --pruner sparsegpt --sparsity 0.7 --bases uniform --definitions margin --phases grid,claims --horizon 0 --stride 0
    --report                 # only the tables, from the JSON
"""

import argparse
import contextlib
import dataclasses
import fcntl
import json
import os

from .absorption_tables import _interpolated, perturbation
from .common import RESULTS, Harness, realised_sparsity, recipe, write

from absorbdeploy import absorb, allocate, calibrate, data, probe
from absorbdeploy.allocate import ALLOCATORS
from absorbdeploy.blocks import matrix_sizes
from absorbdeploy.prune_blocks import plan_counts, prune_sequential
from absorbdeploy.prune_plan import PrunePlan, PruneSpec

STRENGTHS = (0.02, 0.05, 0.08, 0.12)
PATH = RESULTS / "absorption_study.json"


@contextlib.contextmanager
def _locked():
    """An exclusive lock on the results folder: two studies (one per core) may run side by side."""
    RESULTS.mkdir(exist_ok=True)
    fd = os.open(RESULTS, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def save(study: dict, section: str, key: str, draw: str | None = None) -> None:
    """Write this process's `study[section][key]` (one draw of it, given `draw`) into the JSON on disk, keeping what
    other processes wrote there."""
    with _locked():
        disk = json.loads(PATH.read_text()) if PATH.exists() else {}
        if draw is None:
            disk.setdefault(section, {})[key] = study[section][key]
        else:
            disk.setdefault(section, {}).setdefault(key, {})[draw] = study[section][key][draw]
        disk["dense_ppl"] = study.get("dense_ppl", disk.get("dense_ppl"))
        write("absorption_study", {k: v for k, v in disk.items() if k not in ("environment", "torch_threads")})


def setting_recipe(pruner: str, sparsity: float, base: str, draw: int):
    return recipe(allocation__method=base, prune__method=pruner, prune__sparsity=sparsity, calibration__draw=draw,
                  absorption__enabled="true")


def prepare(h: Harness, r):
    """Dense pass and base allocation for recipe `r`: (runner, calibration windows, profile, base, params)."""
    h.reset()
    calib = h.calib(r)
    p = PrunePlan.of(r, probe_all=True)
    runner = calibrate.BlockRunner(h.lm.model, h.lm.blocks, r.calibration.batch_size)
    profile = calibrate.dense_profile(runner, calib, p.dense_pass_hessian, p.probe_states)
    params = [sum(s) for s in matrix_sizes(h.lm.blocks)]
    scores = calibrate.block_scores(runner, p.allocator, profile.stats, p.allocation_options)
    base = allocate.base_allocation(p.allocation, scores, params, p.sparsity, p.allocation_options, p.low, p.high)
    return runner, calib, profile, base, params


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
        if d.composed or perturbation(name) not in measured:
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
    case["base"] = base
    missing = [d for d in definitions if d not in case.get("coefficients", {})]
    if missing:  # only the definitions no earlier grid probed (none: the base allocator alone, no probe)
        coefficients, cost, measured = probe_coefficients(runner, profile, base, r, missing)
        for k in (2, 3, 4, 6, 8):
            cut = truncated_coefficients(measured, k, r.absorption)
            case.setdefault("truncated", {}).setdefault(str(k), {}).update(cut)
        case.setdefault("coefficients", {}).update(coefficients)
        case.setdefault("probe_cost", {}).update(cost)
    coefficients = case.get("coefficients")
    for name in wanted:
        if name not in case["runs"]:
            allocation = base if name == "base" else corrected(name.split(":")[0], float(name.split(":")[1]), base,
                                                               coefficients, params, r)
            case["runs"][name] = score(h, runner, calib, allocation, r, selection)
            print(f"  grid {key} {name}: selection {case['runs'][name]['selection_ppl']:.2f} eval "
                  f"{case['runs'][name]['eval_ppl']:.2f}", flush=True)
            save(study, "grid", key)
    return case


def best_setting(case: dict) -> str | None:
    """The correction with the lowest selection PPL in the grid; None where the grid ran the base alone."""
    return min((n for n in case["runs"] if n != "base"), key=lambda n: case["runs"][n]["selection_ppl"], default=None)


def base_claims(h, study, key, pruner, sparsity, base_method, draws, selection):
    """The base allocator alone over the draws (a setting whose grid has no corrections)."""
    for draw in range(draws):
        entry = study.setdefault("claims", {}).setdefault(key, {}).setdefault(str(draw), {"best": None})
        if "base" not in entry:
            r = setting_recipe(pruner, sparsity, base_method, draw)
            if draw == 0:
                entry["base"] = study["grid"][key]["runs"]["base"]
            else:
                runner, calib, _, base, _ = prepare(h, r)
                entry["base"] = score(h, runner, calib, base, r, selection)
        print(f"  claims {key} draw {draw}: base {entry['base']['eval_ppl']:.2f}", flush=True)
        save(study, "claims", key, str(draw))


def claims(h, study, key, pruner, sparsity, base_method, draws, horizon, stride, selection, first=0):
    best = best_setting(study["grid"][key])
    if best is None:
        return base_claims(h, study, key, pruner, sparsity, base_method, draws, selection)
    definition, strength = best.split(":")[0], float(best.split(":")[1])
    for draw in range(first, draws):
        entry = study.setdefault("claims", {}).setdefault(key, {}).setdefault(str(draw), {"best": best})
        if entry.get("best") != best:  # the grid grew (new definitions or a base-only study): its winner changed
            entry = {"best": best, **({"base": entry["base"]} if "base" in entry else {})}
            study["claims"][key][str(draw)] = entry
        cheaper = [n for n, on in (("cheap", horizon), ("stride", stride)) if on]  # 0 turns a cheaper probe off
        if all(n in entry for n in ("base", "corrected")) and (
                all(n in entry for n in cheaper) or absorb.DEFINITIONS[definition].composed):
            continue
        r = setting_recipe(pruner, sparsity, base_method, draw)
        case = study["grid"][key]
        if draw == 0:  # the grid ran this very draw: its runs and full probe are reused, not repeated
            entry.setdefault("base", case["runs"]["base"])
            entry.setdefault("corrected", case["runs"][best])
        runner, calib, profile, base, params = prepare(h, r)
        if draw == 0:
            entry["coefficients"] = case["coefficients"][definition]
            entry["probe_cost"] = {perturbation(definition): case["probe_cost"][perturbation(definition)]}
        if "coefficients" not in entry:  # kept from an earlier run: the probe is deterministic
            full, entry["probe_cost"], _ = probe_coefficients(runner, profile, base, r, [definition])
            entry["coefficients"] = full[definition]
        coefficients = {definition: entry["coefficients"]}
        if horizon and "cheap_probe_cost" not in entry:
            cheap, entry["cheap_probe_cost"], _ = probe_coefficients(runner, profile, base, r, [definition], horizon)
            entry["cheap_coefficients"] = cheap.get(definition)
        cheap = {definition: entry["cheap_coefficients"]} if horizon and entry.get("cheap_coefficients") else {}
        if "base" not in entry:
            entry["base"] = score(h, runner, calib, base, r, selection)
        if "corrected" not in entry:
            entry["corrected"] = score(h, runner, calib, corrected(definition, strength, base, coefficients, params, r), r,
                                       selection)
        if definition in cheap and "cheap" not in entry:
            entry["cheap"] = score(h, runner, calib, corrected(definition, strength, base, cheap, params, r), r, selection)
            entry["cheap"]["horizon"] = horizon
        if stride and not absorb.DEFINITIONS[definition].composed and "stride" not in entry:  # injections every `stride` blocks
            sparse = {definition: _interpolated(coefficients[definition], stride)}
            entry["stride"] = score(h, runner, calib, corrected(definition, strength, base, sparse, params, r), r,
                                    selection)
            entry["stride"]["stride"] = stride
        cheap_ppl, stride_ppl = (entry.get(n, {}).get("eval_ppl", float("nan")) for n in ("cheap", "stride"))
        print(f"  claims {key} draw {draw}: base {entry['base']['eval_ppl']:.2f}, {best} "
              f"{entry['corrected']['eval_ppl']:.2f}, cheap {cheap_ppl:.2f}, stride {stride_ppl:.2f}", flush=True)
        save(study, "claims", key, str(draw))


def _mean_curves(results: list[dict]) -> dict:
    """The drift curves of the whole probe set from those of its equal-sized parts (per-token means average)."""
    first = results[0]["curves"]
    return {e: [{m: {k: sum(r["curves"][e][l][m][k] for r in results) / len(results) for k in row[m]} for m in row}
                for l, row in enumerate(rows)] for e, rows in first.items()}


def token_subsets(h, study, key, pruner, sparsity, base_method, selection):
    """The fewer-tokens probe: each of the P probe samples alone (1/P of the cost). Their coefficients against the full
    probe's (rank correlation), the corrected allocation each gives (PPL), and the check that the mean of the P parts
    reproduces the full probe."""
    case, r = study["grid"][key], setting_recipe(pruner, sparsity, base_method, 0)
    best = best_setting(case)
    definition, strength = best.split(":")[0], float(best.split(":")[1])
    names = [d for d in case["coefficients"] if not absorb.DEFINITIONS[d].composed]
    done = case.setdefault("tokens", {})
    runner, calib, profile, base, params = prepare(h, r)
    samples, parts = profile.probe_hidden[0].shape[0], {}
    for i in range(samples):  # every probe before any scoring: score() prunes the model in place
        part = dataclasses.replace(profile, probe_hidden=[x[i : i + 1] for x in profile.probe_hidden])
        coefficients, cost, parts[i] = probe_coefficients(runner, part, base, r, names)
        entry = done.setdefault(str(i), {})
        if entry.get("coefficients") not in (None, coefficients):
            entry.pop("run", None)  # measured by an earlier, different probe
        entry.update(samples=1, of=samples, coefficients=coefficients,
                     probe_cost={p: {**c, "equivalents": c["equivalents"] / samples} for p, c in cost.items()})
    for i in range(samples):
        entry, coefficients = done[str(i)], done[str(i)]["coefficients"]
        if "run" not in entry:
            entry["run"] = score(h, runner, calib, corrected(definition, strength, base, coefficients, params, r), r,
                                 selection)
            entry["run"]["correction"] = best
        print(f"  tokens {key} sample {i}: {best} eval {entry['run']['eval_ppl']:.2f}", flush=True)
        save(study, "grid", key)
    mean = {p: {**parts[0][p], "curves": _mean_curves([parts[i][p] for i in parts])} for p in parts[0]}
    done["mean_of_parts"] = {d: absorb.summarise(mean[perturbation(d)], d, r.absorption.eps, r.absorption.eps_small)
                             ["coefficients"] for d in names}
    save(study, "grid", key)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--pruner", default="wanda")
    parser.add_argument("--sparsity", type=float, default=0.7)
    parser.add_argument("--bases", default="atp,dlp")
    parser.add_argument("--definitions", default=",".join(absorb.DEFINITIONS), help="'' for the base alone")
    parser.add_argument("--draws", type=int, default=3)
    parser.add_argument("--horizon", type=int, default=3, help="of the truncated probe in the claims (0: none)")
    parser.add_argument("--stride", type=int, default=5, help="of the interpolated probe in the claims (0: none)")
    parser.add_argument("--first-draw", type=int, default=0, help="claims: start at this draw (a second process)")
    parser.add_argument("--phases", default="grid,claims", help="of grid, tokens, claims")
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
                definitions = [d for d in args.definitions.split(",") if d]
                grid(h, study, key, args.pruner, args.sparsity, base_method, definitions, selection)
            if "tokens" in args.phases:
                token_subsets(h, study, key, args.pruner, args.sparsity, base_method, selection)
            if "claims" in args.phases:
                claims(h, study, key, args.pruner, args.sparsity, base_method, args.draws, args.horizon, args.stride,
                       selection, args.first_draw)
    from .absorption_tables import print_tables

    print_tables(study)
    from .common import table
    from .updates import PATH as UPDATES_PATH
    from .updates import absorption_rows

    rows = absorption_rows(json.loads(UPDATES_PATH.read_text())) if UPDATES_PATH.exists() else []
    if rows:
        print("\nAbsorption on top of the weight updates (bench/updates.py):")
        print(table(rows, list(rows[0])))


if __name__ == "__main__":
    main()
