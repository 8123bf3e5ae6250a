"""The whole job, top to bottom: load -> data -> calibrate -> allocate -> absorb -> prune -> export -> validate -> report.

This is the only module that knows the order. `preflight` does every bad-input check that needs no model (recipe, model
path, text files, formats, output directory), so a bad invocation fails in well under a second with nothing written.
The run itself happens in `DIR.tmp/` and becomes `DIR/` only when complete.
"""

import copy
from dataclasses import dataclass
from pathlib import Path

from absorbdeploy import allocate, atomic, calibrate, data, load, prune, report, validate
from absorbdeploy import exporters
from absorbdeploy.recipe import Recipe, parse_nm, to_yaml
from absorbdeploy.progress import Progress

STAGES = ("load", "data", "calibrate", "allocate", "absorb", "prune", "export", "validate", "report")


@dataclass(frozen=True)
class Plan:
    recipe: Recipe
    source: load.ModelSource
    formats: tuple[str, ...]
    out: Path
    overwrite: bool
    trust_remote_code: bool
    recipe_origin: str


def preflight(recipe: Recipe, out: Path, overwrite: bool, trust_remote_code: bool, recipe_origin: str) -> Plan:
    source = load.resolve_source(recipe.model, trust_remote_code)
    data.check_text_paths(recipe.calibration.text, recipe.validate.text)
    formats = tuple(recipe.export.formats) if recipe.export.formats is not None else tuple(exporters.installed())
    exporters.check_available(formats)
    if recipe.device == "cuda":
        _require_cuda_hardware()
    atomic.check_destination(out, overwrite)
    return Plan(recipe, source, formats, out, overwrite, trust_remote_code, recipe_origin)


def _require_cuda_hardware() -> None:
    import os

    from absorbdeploy.errors import UserError

    if not any(os.path.exists(p) for p in ("/dev/nvidia0", "/proc/driver/nvidia", "/dev/nvidiactl")):
        raise UserError("--device cuda was requested but this machine has no NVIDIA GPU; use --device cpu or auto")


def round_weights(model, dtype_name: str) -> None:
    """Give every weight the value it will have on disk, keeping fp32 compute: all artefacts then hold the same numbers."""
    import torch

    if dtype_name != "float32":
        dtype = getattr(torch, dtype_name)
        for p in model.parameters():
            p.data.copy_(p.data.to(dtype).to(p.dtype))


def prunable_names(model, blocks) -> tuple[str, ...]:
    names = {id(m): n for n, m in model.named_modules()}
    return tuple(f"{names[id(m)]}.weight" for b in blocks for _, m in load.prunable_linears(b))


def run(plan: Plan, progress: Progress) -> dict:
    r = plan.recipe
    with atomic.Staging(plan.out, plan.overwrite) as staging:
        if staging.stale_removed:
            progress.log(f"removed {staging.path} left behind by an interrupted run")
        work = staging.path
        (work / "recipe.resolved.yaml").write_text(to_yaml(r))

        with progress.stage("load", plan.source.name):
            device = load.resolve_device(r.device)
            lm = load.load(plan.source, device, plan.trust_remote_code)
            round_weights(lm.model, r.export.dtype)
            facts = {"weights_sha256": load.weights_sha256(plan.source), "device": str(device)}

        with progress.stage("data", r.calibration.text or data.PROTOCOL):
            corpus = data.build_corpus(lm.tokenizer, r.calibration.text, r.validate.text)
            calib = data.calibration_windows(corpus, r.calibration.nsamples, r.calibration.seqlen, r.calibration.draw)
            evals = data.eval_windows(corpus, r.validate.seqlen, r.validate.eval_windows)
            _check_context(lm.model, max(r.calibration.seqlen, r.validate.seqlen))
            dense_model = copy.deepcopy(lm.model)

        runner = calibrate.BlockRunner(lm.model, lm.blocks, r.calibration.batch_size)
        needs_profile = r.allocation.method in allocate.NEEDS_ACTIVATIONS or r.absorption.enabled or (
            r.calibration.statistics == "dense" and prune.needs_statistics(r.prune))
        with progress.stage("calibrate", f"{calib.shape[0]} x {calib.shape[1]} tokens, dense statistics pass"
                            if needs_profile else "no dense pass needed"):
            profile = None
            if needs_profile:
                probe = (r.absorption.probe_samples, r.absorption.probe_seqlen) if r.absorption.enabled else None
                hessian = r.prune.method == "sparsegpt" and (r.calibration.statistics == "dense" or r.absorption.enabled)
                profile = calibrate.dense_profile(runner, calib, hessian, probe, progress.blocks("dense pass"))

        sizes = prune.matrix_sizes(lm.blocks)
        params = [sum(s) for s in sizes]
        target = r.prune.sparsity
        with progress.stage("allocate", r.allocation.method):
            scores = allocate.block_scores(r.allocation.method, lm.blocks, profile.stats if profile else None, r.allocation)
            base = allocate.base_allocation(r.allocation.method, scores, params, target, r.allocation)

        with progress.stage("absorb", "enabled" if r.absorption.enabled else "disabled"):
            final, absorption = base, None
            if r.absorption.enabled:
                from absorbdeploy import absorb

                final, absorption = absorb.correct_allocation(runner, profile, base, params, r, work, progress)

        with progress.stage("prune", f"{r.prune.method} {r.prune.structure}, {r.calibration.statistics} statistics"):
            counts = prune.plan_counts(lm.blocks, final, target)
            if not prune.needs_statistics(r.prune) or r.calibration.statistics == "dense":
                records = prune.prune_from_profile(lm.blocks, profile.stats if profile else None, counts, r.prune,
                                                   progress.blocks("prune"))
            else:
                records = prune.prune_sequential(runner, calib, counts, r.prune, progress.blocks("sequential prune"))
            if profile is not None:
                profile.stats = None
            round_weights(lm.model, r.export.dtype)
            allocation = report.allocation_section(r, params, scores, base, final, absorption, lm.blocks, records)
            report.write_allocation_csv(work / "allocation.csv", allocation)

        spec = exporters.ExportSpec(
            dtype=r.export.dtype, prunable=prunable_names(lm.model, lm.blocks), nm=parse_nm(r.prune.structure),
            max_shard_size=r.export.max_shard_size, onnx_sparse=r.export.onnx.sparse, onnx_opset=r.export.onnx.opset,
            onnx_dtype=r.export.onnx.dtype,
            sidecar=report.sidecar(plan, facts, corpus, allocation),
        )
        with progress.stage("export", ", ".join(plan.formats)):
            artefacts = {}
            for fmt in plan.formats:
                artefacts[fmt] = exporters.get(fmt).export(lm.model, lm.tokenizer, work / fmt, spec)
                progress.log(f"    {fmt}: {artefacts[fmt].bytes / 2**20:.1f} MiB in {artefacts[fmt].seconds:.1f} s")

        with progress.stage("validate", f"{evals.shape[0]} x {evals.shape[1]} evaluation tokens"):
            checks = validate.validate_exports(lm.model, dense_model, lm.tokenizer, artefacts, spec, evals, r,
                                               work / ".baselines", progress)

        with progress.stage("report"):
            payload = report.build(plan, facts, corpus, calib, evals, allocation, absorption, records, checks,
                                   artefacts, progress.stages)
            report.write(work, payload)
        staging.commit()
    payload["output"] = str(plan.out)
    return payload


def _check_context(model, seqlen: int) -> None:
    from absorbdeploy.errors import UserError

    limit = getattr(model.config, "max_position_embeddings", None)
    if limit is not None and seqlen > limit:
        raise UserError(f"seqlen {seqlen} exceeds the model's context of {limit} tokens; lower calibration.seqlen / validate.seqlen")
