"""The whole job, top to bottom: load -> data -> calibrate -> allocate -> absorb -> prune -> export -> validate -> report.

This is the only module that knows the order. `preflight` does every bad-input check that needs no model (recipe, model
path, text files, formats, output directory), so a bad invocation fails in well under a second with nothing written.
The run itself happens in `DIR.tmp/` and becomes `DIR/` only when complete.
"""

import copy
import dataclasses
from dataclasses import dataclass
from pathlib import Path

from absorbdeploy import allocate, atomic, calibrate, data, load, prune, report, stream, validate
from absorbdeploy import source as source_
from absorbdeploy import exporters
from absorbdeploy.recipe import ModelFacts, Recipe, check, parse_nm, settle, to_yaml
from absorbdeploy.progress import Progress

STAGES = ("load", "data", "calibrate", "allocate", "absorb", "prune", "export", "validate", "report")


@dataclass(frozen=True)
class Plan:
    recipe: Recipe
    source: source_.ModelSource
    formats: tuple[str, ...]
    out: Path
    overwrite: bool
    trust_remote_code: bool
    recipe_origin: str
    notes: tuple[str, ...] = ()  # defaults that followed another setting or the model (recipe_rules.settle)


def preflight(recipe: Recipe, out: Path, overwrite: bool, trust_remote_code: bool, recipe_origin: str,
              probe: bool = False) -> Plan:
    """Every check that needs no model weights; settles the recipe's following defaults against the model's facts.
    `probe`: the command runs the absorption probe whatever absorption.enabled says (analyze)."""
    from absorbdeploy.recipe_rules import check_probe

    source = source_.resolve_source(recipe.model, trust_remote_code)
    recipe, notes = settle(recipe, ModelFacts(source.context, source.dtype))
    check(recipe)
    if probe:
        check_probe(recipe)
    if source.context is not None:
        _check_context(source.context, max(recipe.calibration.seqlen, recipe.validate.seqlen))
    data.check_text_paths(recipe.calibration.text, recipe.validate.text)
    formats = tuple(recipe.export.formats) if recipe.export.formats is not None else tuple(exporters.installed())
    exporters.check_available(formats)
    if recipe.device == "cuda":
        _require_cuda_hardware()
    inputs = source_.input_paths(source) + [Path(t).expanduser() for t in (recipe.calibration.text, recipe.validate.text) if t]
    if Path(recipe_origin).is_file():
        inputs.append(Path(recipe_origin))
    atomic.check_destination(out, overwrite, inputs)
    return Plan(recipe, source, formats, out, overwrite, trust_remote_code, recipe_origin, tuple(notes))


def _require_cuda_hardware() -> None:
    import os

    from absorbdeploy.errors import UserError

    if not any(os.path.exists(p) for p in ("/dev/nvidia0", "/proc/driver/nvidia", "/dev/nvidiactl")):
        raise UserError("--device cuda was requested but this machine has no NVIDIA GPU; use --device cpu or auto")


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

        for note in plan.notes:
            progress.log(f"note: {note}")
        with progress.stage("load", plan.source.name):
            lm, facts = load_model(plan, progress)
            streaming = lm.store is not None
            formats = _formats_for(plan, streaming)
            if streaming:
                lm.store.writer = stream.ShardWriter(work / "vllm", stream.streaming_shard_bytes(r.export.max_shard_size))
            facts["weights_sha256"] = source_.weights_sha256(plan.source)

        with progress.stage("data", r.calibration.text or data.PROTOCOL):
            corpus = data.build_corpus(lm.tokenizer, r.calibration.text, r.validate.text)
            calib = data.calibration_windows(corpus, r.calibration.nsamples, r.calibration.seqlen, r.calibration.draw)
            evals = data.eval_windows(corpus, r.validate.seqlen, r.validate.eval_windows)
            _check_context(getattr(lm.model.config, "max_position_embeddings", None), max(r.calibration.seqlen, r.validate.seqlen))
            dense_model = None if streaming else copy.deepcopy(lm.model)

        outcome = prune_model(lm, calib, r, progress, work)
        outcome.profile = None  # statistics and probe states are not needed past pruning
        allocation = report.allocation_section(r, outcome)
        report.write_allocation_csv(work / "allocation.csv", allocation)

        spec = exporters.ExportSpec(
            dtype=r.export.dtype, prunable=prunable_names(lm.model, lm.blocks), nm=parse_nm(r.prune.structure),
            max_shard_size=r.export.max_shard_size, onnx_sparse=r.export.onnx.sparse, onnx_opset=r.export.onnx.opset,
            onnx_dtype=r.export.onnx.dtype, onnx_kv_cache=r.export.onnx.kv_cache,
            sidecar=report.sidecar(plan, facts, corpus, allocation), streamed=lm.store.writer if streaming else None,
        )
        with progress.stage("export", ", ".join(formats)):
            artefacts = {}
            for fmt in formats:  # in streaming mode vllm/ comes first: the other formats are converted from it
                fmt_spec = spec if fmt == "vllm" or not streaming else dataclasses.replace(
                    spec, streamed=None, checkpoint=str(work / "vllm"))
                artefacts[fmt] = exporters.get(fmt).export(lm.model, lm.tokenizer, work / fmt, fmt_spec)
                progress.log(f"    {fmt}: {artefacts[fmt].bytes / 2**20:.1f} MiB in {artefacts[fmt].seconds:.1f} s")

        with progress.stage("validate", f"{evals.shape[0]} x {evals.shape[1]} evaluation tokens"):
            _to_fp32(lm, dense_model)  # the reference for equality checks computes in fp32 (exact from 16-bit weights)
            subjects = _subjects(lm, dense_model, r, work, streaming)
            checks = validate.validate_exports(subjects, lm.tokenizer, artefacts, spec, evals, r, work / ".baselines",
                                               progress)

        with progress.stage("report"):
            payload = report.build(plan, facts, corpus, calib, evals, allocation, outcome, checks, artefacts,
                                   progress.stages)
            payload["streaming"] = facts["streaming"]
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
        lm = load.load_streaming(plan.source, device, r.export.dtype, plan.trust_remote_code, dtype)
    else:
        lm = load.load(plan.source, device, plan.trust_remote_code, dtype)
        load.check_weights(lm.model.named_parameters(), r.export.dtype)
        rounding = load.round_weights(lm.model, r.export.dtype)
        if rounding["changed"]:
            progress.log(f"note: {plan.source.dtype} weights rounded to {r.export.dtype} for export: {rounding['changed']:,} "
                         f"of {rounding['weights']:,} values change, by up to {rounding['max_abs_change']:.3g}")
    return lm, {"device": str(device), "streaming": {"enabled": streaming, "why": why},
                "dtype": {"source": plan.source.dtype, "export": r.export.dtype, "rounding": rounding}}


def _to_fp32(lm, dense_model) -> None:
    import torch

    for model in (lm.model, dense_model):
        if model is not None and next(model.parameters()).dtype != torch.float32:
            model.float()
    if lm.store is not None:
        lm.store.dtype = torch.float32
        lm.model.float()


def _formats_for(plan: Plan, streaming: bool) -> tuple[str, ...]:
    """In streaming mode the vllm/ checkpoint is what the pruned blocks are written into, so it always comes first."""
    if not streaming:
        return plan.formats
    return ("vllm",) + tuple(f for f in plan.formats if f != "vllm")


def _subjects(lm, dense_model, r: Recipe, work: Path, streaming: bool) -> validate.Subjects:
    from absorbdeploy.runners import TorchRunner

    batch = r.calibration.batch_size
    dense_bytes = {f: validate.dense_weight_bytes(lm.model, r.export.onnx.dtype if f == "onnx" else r.export.dtype)
                   for f in exporters.FORMATS}
    if streaming:
        return validate.Subjects(stream.StreamedRunner(lm, work / "vllm", batch), stream.StreamedRunner(lm, None, batch),
                                 lm.model.config.vocab_size, dense_checkpoint=Path(lm.source.path), dense_bytes=dense_bytes)
    return validate.Subjects(TorchRunner(lm.model, batch), TorchRunner(dense_model, batch), lm.model.config.vocab_size,
                             pruned_model=lm.model, dense_model=dense_model, dense_bytes=dense_bytes)


def prune_model(lm, calib, r: Recipe, progress: Progress, work: Path | None = None, profile=None) -> PruneOutcome:
    """calibrate -> allocate -> absorb -> prune, in place on lm.model. A cached dense `profile` may be passed in."""
    nm = parse_nm(r.prune.structure)
    if nm is not None:
        _check_nm_shapes(lm.blocks, nm)
    runner = calibrate.BlockRunner(lm.model, lm.blocks, r.calibration.batch_size, store=lm.store)
    dense_stats = r.calibration.statistics == "dense" and prune.needs_statistics(r.prune)
    needs_profile = r.allocation.method in allocate.NEEDS_ACTIVATIONS or r.absorption.enabled or dense_stats
    with progress.stage("calibrate", f"{calib.shape[0]} x {calib.shape[1]} tokens, dense statistics pass"
                        if needs_profile and profile is None else "no dense pass needed"):
        if needs_profile and profile is None:
            probe = (r.absorption.probe_samples, r.absorption.probe_seqlen) if r.absorption.enabled else None
            hessian = r.prune.method == "sparsegpt" and (dense_stats or r.absorption.enabled)
            profile = calibrate.dense_profile(runner, calib, hessian, probe, progress.blocks("dense pass"))

    params = [sum(s) for s in prune.matrix_sizes(lm.blocks)]
    target = r.prune.sparsity
    with progress.stage("allocate", r.allocation.method):
        scores = allocate.block_scores(r.allocation.method, runner, profile.stats if profile else None, r.allocation)
        base = allocate.base_allocation(r.allocation.method, scores, params, target, r.allocation)

    with progress.stage("absorb", "enabled" if r.absorption.enabled else "disabled"):
        final, absorption = base, None
        if r.absorption.enabled:
            from absorbdeploy import absorb

            final, absorption = absorb.correct_allocation(runner, profile, base, params, r, work, progress)

    with progress.stage("prune", f"{r.prune.method} {r.prune.structure}, {r.calibration.statistics} statistics"):
        counts = prune.plan_counts(lm.blocks, final, target)
        if not prune.needs_statistics(r.prune) or r.calibration.statistics == "dense":
            records = prune.prune_from_profile(runner, profile.stats if profile else None, counts, r.prune,
                                               progress.blocks("prune"), r.export.dtype)
        else:
            records = prune.prune_sequential(runner, calib, counts, r.prune, progress.blocks("sequential prune"),
                                             r.export.dtype)
        load.round_weights(lm.model, r.export.dtype)
    return PruneOutcome(params, scores, base, final, absorption, records, profile, needs_profile)


def analyze(plan: Plan, progress: Progress) -> dict:
    """load -> data -> dense pass with probe states -> base allocation -> full absorption profile; nothing pruned."""
    from absorbdeploy import absorb
    from absorbdeploy.plots import write_absorption

    r = plan.recipe
    with atomic.Staging(plan.out, plan.overwrite) as staging:
        work = staging.path
        (work / "recipe.resolved.yaml").write_text(to_yaml(r))
        with progress.stage("load", plan.source.name):
            lm, _ = load_model(plan, progress)
        with progress.stage("data", r.calibration.text or data.PROTOCOL):
            corpus = data.build_corpus(lm.tokenizer, r.calibration.text, r.validate.text)
            calib = data.calibration_windows(corpus, r.calibration.nsamples, r.calibration.seqlen, r.calibration.draw)
        runner = calibrate.BlockRunner(lm.model, lm.blocks, r.calibration.batch_size, store=lm.store)
        with progress.stage("calibrate", f"{calib.shape[0]} x {calib.shape[1]} tokens, dense statistics pass"):
            profile = calibrate.dense_profile(runner, calib, r.prune.method == "sparsegpt",
                                              (r.absorption.probe_samples, r.absorption.probe_seqlen), progress.blocks("dense pass"))
        params = [sum(s) for s in prune.matrix_sizes(lm.blocks)]
        with progress.stage("allocate", r.allocation.method):
            scores = allocate.block_scores(r.allocation.method, runner, profile.stats, r.allocation)
            base = allocate.base_allocation(r.allocation.method, scores, params, r.prune.sparsity, r.allocation)
        with progress.stage("absorb", "probe at every block, three eps, Gaussian control"):
            result = absorb.analyze(runner, profile, base, params, r, progress)
            result["model"] = plan.source.name
            result["scores"] = scores
            write_absorption(work, result)
        staging.commit()
    result["output"] = str(plan.out)
    return result


def revalidate(directory: Path, progress: Progress) -> dict:
    """`absorbdeploy validate DIR`: reload every artefact of a finished run, recompute the checks and gates against a
    reference rebuilt from the run's own checkpoint, and rewrite report.json / report.md in place."""
    import json

    from absorbdeploy.errors import UserError
    from absorbdeploy.recipe import from_yaml_text

    folder = Path(directory)
    if not (folder / "report.json").is_file() or not (folder / "recipe.resolved.yaml").is_file():
        raise UserError(f"{directory} is not a finished absorbdeploy output (no report.json / recipe.resolved.yaml)")
    try:
        old = json.loads((folder / "report.json").read_text())
    except json.JSONDecodeError:
        raise UserError(f"{folder / 'report.json'} is not valid JSON; re-run prune-and-export") from None
    r = from_yaml_text((folder / "recipe.resolved.yaml").read_text(), str(folder / "recipe.resolved.yaml"))
    formats = [f for f in exporters.FORMATS if (folder / f).is_dir()]
    exporters.check_available(formats)
    source = source_.resolve_source(r.model)
    with progress.stage("load", f"{source.name} (dense) and the run's own pruned checkpoint"):
        if source_.weights_sha256(source) != old["model"]["weights_sha256"]:
            raise UserError(f"the source model {source.name} changed since the run (weights sha256 differs); re-run prune-and-export")
        lm = load.load(source, load.resolve_device(r.device))
        load.round_weights(lm.model, r.export.dtype)
        reference = _reference_from(folder, formats)
    with progress.stage("data", r.calibration.text or data.PROTOCOL):
        corpus = data.build_corpus(lm.tokenizer, r.calibration.text, r.validate.text)
        evals = data.eval_windows(corpus, r.validate.seqlen, r.validate.eval_windows)
    meta = exporters.read_sidecar(folder / formats[0])
    spec = exporters.ExportSpec(dtype=r.export.dtype, prunable=tuple(meta["prunable"]), nm=parse_nm(r.prune.structure),
                                max_shard_size=r.export.max_shard_size, onnx_sparse=r.export.onnx.sparse,
                                onnx_opset=r.export.onnx.opset, onnx_dtype=r.export.onnx.dtype,
                                onnx_kv_cache=r.export.onnx.kv_cache)
    artefacts = {f: exporters.Artifact(f, str(folder / f), exporters.list_files(folder / f),
                                       old["artefacts"].get(f, {}).get("export_seconds", 0.0)) for f in formats}
    with progress.stage("validate", f"{evals.shape[0]} x {evals.shape[1]} evaluation tokens"):
        from absorbdeploy.runners import TorchRunner

        batch = r.calibration.batch_size
        subjects = validate.Subjects(TorchRunner(reference, batch), TorchRunner(lm.model, batch), lm.model.config.vocab_size,
                                     pruned_model=reference, dense_model=lm.model,
                                     dense_bytes={f: old["artefacts"].get(f, {}).get("dense_bytes") for f in formats})
        checks = validate.validate_exports(subjects, lm.tokenizer, artefacts, spec, evals, r,
                                           folder.with_name(folder.name + ".validate.tmp"), progress)
    payload = {**old, **report.validation_sections(checks, artefacts, r.export.dtype), "revalidated": report._now()}
    report.write(folder, payload)
    payload["output"] = str(folder)
    return payload


def _reference_from(folder: Path, formats: list[str]):
    """The pruned model as the run exported it: the vllm/ checkpoint through transformers, else the decoded archive."""
    import torch
    from transformers import AutoModelForCausalLM

    from absorbdeploy.errors import UserError

    if "vllm" in formats:
        return AutoModelForCausalLM.from_pretrained(folder / "vllm", dtype=torch.float32, use_safetensors=True).eval()
    if "compressed-safetensors" in formats:
        return exporters.get("compressed-safetensors").load(folder / "compressed-safetensors").model
    raise UserError(f"{folder} has neither vllm/ nor compressed-safetensors/, from which validate rebuilds the pruned model")


def _check_nm_shapes(blocks, nm: tuple[int, int]) -> None:
    from absorbdeploy.errors import UserError

    for index, block in enumerate(blocks):
        for name, linear in load.prunable_linears(block):
            if linear.in_features % nm[1]:
                raise UserError(f"prune.structure {nm[0]}:{nm[1]} needs every Linear's input dimension divisible by {nm[1]}; "
                                f"block {index} {name} has {linear.in_features} inputs")


def _check_context(limit: int | None, seqlen: int) -> None:
    from absorbdeploy.errors import UserError

    if limit is not None and seqlen > limit:
        raise UserError(f"seqlen {seqlen} exceeds the model's context of {limit} tokens; lower calibration.seqlen / validate.seqlen")
