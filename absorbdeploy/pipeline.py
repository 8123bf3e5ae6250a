"""The whole job, top to bottom: load -> data -> calibrate -> allocate -> absorb -> prune -> export -> validate -> report.

This is the only module that knows the order. `preflight` does every bad-input check that needs no model (recipe, model
path, text files, formats, output directory), so a bad invocation fails in well under a second with nothing written.
The run itself happens in `DIR.tmp/` and becomes `DIR/` only when complete. Methods are looked up in their tables
(prune.PRUNERS, allocate.ALLOCATORS, absorb.DEFINITIONS, exporters.FORMATS) through the prune plan (prune_plan.py);
no method name is compared here.
"""

import copy
from dataclasses import dataclass
from pathlib import Path

from absorbdeploy import atomic, blocks, calibrate, data, export_files, exporters, load, plots, probe, report, stream
from absorbdeploy import validate
from absorbdeploy import source as source_
from absorbdeploy.allocate import base_allocation
from absorbdeploy.progress import Progress
from absorbdeploy.prune_blocks import plan_counts, prune_from_profile, prune_sequential
from absorbdeploy.prune_plan import PrunePlan
from absorbdeploy.recipe import ModelFacts, Recipe, check_settled, settle, structure_name, to_yaml
from absorbdeploy.sparse.directory import check_directory

STAGES = ("load", "data", "calibrate", "allocate", "absorb", "prune", "export", "validate", "report")


@dataclass(frozen=True)
class Plan:
    recipe: Recipe  # settled: every following default filled in
    source: source_.ModelSource
    formats: tuple[str, ...]
    out: Path
    overwrite: bool
    trust_remote_code: bool
    recipe_origin: str
    notes: tuple[str, ...] = ()  # defaults that followed another setting or the model (recipe_rules.settle)


def preflight(recipe: Recipe, out: Path, overwrite: bool, trust_remote_code: bool, recipe_origin: str,
              probe_all: bool = False) -> Plan:
    """Every check that needs no model weights; settles the recipe's following defaults against the model's facts.
    `probe_all`: the command runs the absorption probe whatever absorption.enabled says (analyze)."""
    from absorbdeploy.recipe_rules import check_probe

    source = source_.resolve_source(recipe.model, trust_remote_code)
    recipe, notes = settle(recipe, ModelFacts(source.context, source.dtype))
    check_settled(recipe)
    if probe_all:
        check_probe(recipe)
    data.check_context(source.context, max(recipe.calibration.seqlen, recipe.validate.seqlen))
    data.check_text_paths(recipe.calibration.text, recipe.validate.text)
    formats, format_notes = exporters.select(recipe.export.formats, recipe.export.dtype)
    load.check_device_present(recipe.device)
    texts = [Path(t).expanduser() for t in (recipe.calibration.text, recipe.validate.text) if t]
    recipe_file = [Path(recipe_origin)] if Path(recipe_origin).is_file() else []
    atomic.check_destination(out, overwrite, source_.input_paths(source) + texts + recipe_file)
    return Plan(recipe, source, formats, out, overwrite, trust_remote_code, recipe_origin, tuple(notes + format_notes))


def run(plan: Plan, progress: Progress) -> dict:
    r = plan.recipe
    with atomic.Staging(plan.out, plan.overwrite) as staging:
        if staging.stale_removed:
            progress.log(f"removed {staging.path} left behind by an interrupted run")
        work = staging.path
        (work / "recipe.resolved.yaml").write_text(to_yaml(r))
        for note in plan.notes:
            progress.log(f"note: {note}")
        with progress.stage("load", plan.source.name):
            lm, facts = load_model(plan, progress)
            streaming = lm.store is not None
            formats = _formats_for(plan, streaming)
            if streaming:
                limit = export_files.streaming_shard_bytes(r.export.max_shard_size)
                lm.store.writer = export_files.ShardWriter(work / exporters.CHECKPOINT_FORMAT, limit)

        with progress.stage("data", r.calibration.text or data.PROTOCOL):
            corpus, calib, evals = load_data(lm, r)
            dense_model = None if streaming else copy.deepcopy(lm.model)

        outcome = prune_model(lm, calib, r, progress)
        outcome.profile = None  # statistics and probe states are not needed past pruning
        allocation = report.allocation_section(r, outcome)
        report.write_allocation_csv(work / "allocation.csv", allocation)
        if outcome.absorption is not None:
            plots.write_absorption(work, outcome.absorption)

        prunable = blocks.prunable_names(lm.model, lm.blocks)
        sidecar = report.sidecar(plan, facts, corpus, allocation)
        specs = {f: exporters.spec_for(f, r.export, prunable, r.prune.structure, sidecar) for f in formats}
        with progress.stage("export", ", ".join(formats)):
            artefacts = {}
            for fmt in formats:  # streaming: the checkpoint format comes first and holds the pruned blocks already
                spec = specs[fmt]
                if streaming:
                    spec = exporters.streamed(spec, fmt, lm.store.writer, work / exporters.CHECKPOINT_FORMAT)
                artefacts[fmt] = exporters.get(fmt).export(lm.model, lm.tokenizer, work / fmt, spec)
                progress.log(f"    {fmt}: {artefacts[fmt].bytes / 2**20:.1f} MiB in {artefacts[fmt].seconds:.1f} s")

        with progress.stage("validate", f"{evals.shape[0]} x {evals.shape[1]} evaluation tokens"):
            _to_fp32(lm, dense_model)  # the reference for equality checks computes in fp32 (exact from 16-bit weights)
            subjects = _subjects(lm, dense_model, specs, r.calibration.batch_size, work)
            checks = validate.validate_exports(subjects, lm.tokenizer, artefacts, specs, evals, r.validate,
                                               r.calibration.seed, work / ".baselines", progress)

        with progress.stage("report"):
            payload = report.build(plan, facts, corpus, calib, evals, allocation, outcome, checks, artefacts,
                                   progress.stages)
            report.write(work, payload)
        staging.commit()
    payload["output"] = str(plan.out)
    return payload


@dataclass
class PruneOutcome:
    params: list[int]  # prunable weights per block
    scores: list[float] | None  # the allocator's per-block signal
    base: list[float]  # the allocator's sparsities (exact budget)
    final: list[float]  # after the absorption correction (= base when it is off)
    absorption: dict | None
    records: list  # prune.MatrixRecord per matrix
    profile: calibrate.DenseProfile | None  # kept for callers that reuse it (benchmarks); the pipeline drops it
    dense_pass: bool


def load_model(plan: Plan, progress: Progress):
    """The model in memory (or, above the memory budget, a streaming skeleton), its weights checked for non-finite
    and unrepresentable values and rounded to the export dtype; returns (LoadedModel, facts for the report)."""
    r = plan.recipe
    device = load.resolve_device(r.device)
    streaming, why = stream.decide(plan.source, r.streaming.mode, r.streaming.memory_budget_gb, device)
    dtype = load.compute_dtype(device, r.export.dtype)
    rounding = None
    if streaming:
        progress.log(f"    streaming block by block: {why}")
        lm = stream.load_streaming(plan.source, device, r.export.dtype, plan.trust_remote_code, dtype)
    else:
        lm = load.load(plan.source, device, plan.trust_remote_code, dtype)
        load.check_weights(lm.model.named_parameters(), r.export.dtype)
        rounding = load.round_weights(lm.model, r.export.dtype)
        if rounding["changed"]:
            progress.log(f"note: {plan.source.dtype} weights rounded to {r.export.dtype} for export: {rounding['changed']:,} "
                         f"of {rounding['weights']:,} values change, by up to {rounding['max_abs_change']:.3g}")
    return lm, {"device": str(device), "streaming": {"enabled": streaming, "why": why},
                "dtype": {"source": plan.source.dtype, "export": r.export.dtype, "rounding": rounding},
                "weights_sha256": source_.weights_sha256(plan.source)}


def load_data(lm, r: Recipe):
    """(corpus, calibration windows [n, T], evaluation windows [N, T]) under the recipe's protocol."""
    corpus = data.build_corpus(lm.tokenizer, r.calibration.text, r.validate.text)
    calib = data.calibration_windows(corpus, r.calibration.nsamples, r.calibration.seqlen, r.calibration.draw)
    evals = data.eval_windows(corpus, r.validate.seqlen, r.validate.eval_windows)
    data.check_context(getattr(lm.model.config, "max_position_embeddings", None), max(r.calibration.seqlen, r.validate.seqlen))
    return corpus, calib, evals


def prune_model(lm, calib, r: Recipe, progress: Progress, profile=None) -> PruneOutcome:
    """calibrate -> allocate -> absorb -> prune, in place on lm.model. A cached dense `profile` may be passed in."""
    p = PrunePlan.of(r)
    if p.spec.nm is not None:
        blocks.check_nm(lm.blocks, p.spec.nm)
    runner, profile, params, scores, base = _dense_pass_and_allocation(lm, calib, p, r, progress, profile)

    with progress.stage("absorb", "enabled" if p.absorption else "disabled"):
        final, absorption = base, None
        if p.absorption:
            final, absorption = probe.correct_allocation(runner, profile, base, params, p.sparsity, p.spec, r.absorption,
                                                         p.correction, p.low, p.high, r.calibration.seed, progress)

    with progress.stage("prune", f"{r.prune.method} {structure_name(p.spec.nm)}, {r.calibration.statistics} statistics"):
        counts = plan_counts(lm.blocks, final, p.sparsity)
        commit = (lambda k: lm.store.commit(k, r.export.dtype)) if lm.store is not None else None
        if p.from_dense_pass:
            records = prune_from_profile(runner, profile.stats if profile else None, counts, p.spec, progress.blocks("prune"),
                                         commit)
        else:
            records = prune_sequential(runner, calib, counts, p.spec, progress.blocks("sequential prune"), commit,
                                       p.reconstruct)
        load.round_weights(lm.model, r.export.dtype)
    return PruneOutcome(params, scores, base, final, absorption, records, profile, p.needs_dense_pass)


def _dense_pass_and_allocation(lm, calib, p: PrunePlan, r: Recipe, progress: Progress, profile=None):
    """The dense pass (when the plan needs it and no cached `profile` is given) and the base allocation; returns
    (runner, profile, params per block, the allocator's scores, the base sparsities)."""
    runner = calibrate.BlockRunner(lm.model, lm.blocks, r.calibration.batch_size, store=lm.store)
    run_pass = p.needs_dense_pass and profile is None
    with progress.stage("calibrate", f"{calib.shape[0]} x {calib.shape[1]} tokens, dense statistics pass"
                        if run_pass else "no dense pass needed"):
        if run_pass:
            profile = calibrate.dense_profile(runner, calib, p.dense_pass_hessian, p.probe_states,
                                              progress.blocks("dense pass"))
    params = [sum(s) for s in blocks.matrix_sizes(lm.blocks)]
    with progress.stage("allocate", p.allocation):
        scores = calibrate.block_scores(runner, p.allocator, profile.stats if profile else None, p.allocation_options)
        base = base_allocation(p.allocation, scores, params, p.sparsity, p.allocation_options, p.low, p.high)
    return runner, profile, params, scores, base


def analyze(plan: Plan, progress: Progress) -> dict:
    """load -> data -> dense pass with probe states -> base allocation -> full absorption profile; nothing pruned."""
    r = plan.recipe
    with atomic.Staging(plan.out, plan.overwrite) as staging:
        work = staging.path
        (work / "recipe.resolved.yaml").write_text(to_yaml(r))
        with progress.stage("load", plan.source.name):
            lm, _ = load_model(plan, progress)
        with progress.stage("data", r.calibration.text or data.PROTOCOL):
            _, calib, _ = load_data(lm, r)
        p = PrunePlan.of(r, probe_all=True)
        runner, profile, params, scores, base = _dense_pass_and_allocation(lm, calib, p, r, progress)
        with progress.stage("absorb", "probe at every block, three eps, Gaussian control"):
            result = probe.profile_all(runner, profile, base, params, p.sparsity, p.spec, r.absorption, p.correction,
                                       p.low, p.high, r.calibration.seed, progress)
            result["model"] = plan.source.name
            result["scores"] = scores
            plots.write_absorption(work, result)
        staging.commit()
    result["output"] = str(plan.out)
    return result


def revalidate(directory: Path, progress: Progress) -> dict:
    """`absorbdeploy validate DIR`: reload every artefact of a finished run, recompute the checks and gates against a
    reference rebuilt from the run's own checkpoint, and rewrite report.json / report.md in place."""
    folder = Path(directory)
    old, r = report.read_finished(folder)
    formats = [f for f in exporters.FORMATS if (folder / f).is_dir()]
    exporters.check_available(formats)
    for fmt in formats:  # a damaged packed export is bad input (exit 2), not a failed reload found minutes later
        check_directory(folder / fmt)
    source = source_.resolve_source(r.model)
    with progress.stage("load", f"{source.name} (dense) and the run's own pruned checkpoint"):
        report.check_same_source(source_.weights_sha256(source), old, source.name)
        lm = load.load(source, load.resolve_device(r.device))
        load.round_weights(lm.model, r.export.dtype)
        reference = _reference_from(folder, formats)
    with progress.stage("data", r.calibration.text or data.PROTOCOL):
        _, _, evals = load_data(lm, r)
    prunable = export_files.read_sidecar(folder / formats[0])["prunable"]
    specs = {f: exporters.spec_for(f, r.export, prunable, r.prune.structure) for f in formats}
    artefacts = {f: exporters.Artifact(f, str(folder / f), export_files.list_files(folder / f),
                                       old["artefacts"].get(f, {}).get("export_seconds", 0.0)) for f in formats}
    with progress.stage("validate", f"{evals.shape[0]} x {evals.shape[1]} evaluation tokens"):
        from absorbdeploy.runners import TorchRunner

        batch = r.calibration.batch_size
        subjects = validate.Subjects(TorchRunner(reference, batch), TorchRunner(lm.model, batch), lm.model.config.vocab_size,
                                     pruned_model=reference, dense_model=lm.model, batch_size=batch,
                                     dense_bytes={f: old["artefacts"].get(f, {}).get("dense_bytes") for f in formats})
        checks = validate.validate_exports(subjects, lm.tokenizer, artefacts, specs, evals, r.validate, r.calibration.seed,
                                           folder.with_name(folder.name + ".validate.tmp"), progress)
    payload = {**old, **report.validation_sections(checks, artefacts, r.export.dtype), "revalidated": report._now()}
    report.write(folder, payload)
    payload["output"] = str(folder)
    return payload


def _reference_from(folder: Path, formats: list[str]):
    """The pruned model as the run exported it: the first artefact directory that loads as a model (a plain or a
    bitmask checkpoint), in fp32."""
    import torch

    from absorbdeploy.errors import UserError

    for fmt in formats:
        if (folder / fmt / "config.json").is_file():
            return load.load(source_.resolve_source(str(folder / fmt)), torch.device("cpu")).model
    raise UserError(f"{folder} holds no checkpoint directory from which validate can rebuild the pruned model")


def _to_fp32(lm, dense_model) -> None:
    import torch

    for model in (lm.model, dense_model):
        if model is not None and next(model.parameters()).dtype != torch.float32:
            model.float()
    if lm.store is not None:
        lm.store.dtype = torch.float32
        lm.model.float()


def _formats_for(plan: Plan, streaming: bool) -> tuple[str, ...]:
    """In streaming mode the checkpoint format is what the pruned blocks are written into, so it always comes first."""
    if not streaming:
        return plan.formats
    return (exporters.CHECKPOINT_FORMAT,) + tuple(f for f in plan.formats if f != exporters.CHECKPOINT_FORMAT)


def _subjects(lm, dense_model, specs: dict, batch: int, work: Path) -> validate.Subjects:
    from absorbdeploy.runners import TorchRunner

    dense_bytes = {f: validate.dense_weight_bytes(lm.model, spec.dtype) for f, spec in specs.items()}
    vocab = lm.model.config.vocab_size
    if lm.store is not None:
        pruned = work / exporters.CHECKPOINT_FORMAT
        return validate.Subjects(stream.StreamedRunner(lm, pruned, batch), stream.StreamedRunner(lm, None, batch), vocab,
                                 dense_checkpoint=Path(lm.source.path), pruned_checkpoint=pruned, dense_bytes=dense_bytes,
                                 batch_size=batch)
    return validate.Subjects(TorchRunner(lm.model, batch), TorchRunner(dense_model, batch), vocab, pruned_model=lm.model,
                             dense_model=dense_model, dense_bytes=dense_bytes, batch_size=batch)
