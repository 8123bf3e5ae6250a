"""Stage 8, validate: reload every artefact in each of its runtimes and compare it with the in-memory pruned model
(compare.py: the reference, the comparison, the gate verdicts; a failed gate is exit code 1). Per runtime the dense
model is scored too (PPL ratio) and both are timed side by side, interleaved.
"""

from dataclasses import dataclass
from pathlib import Path

from absorbdeploy import compare, export_files, latency
from absorbdeploy.runners import Runner, TorchRunner


@dataclass
class Subjects:
    """What validation compares the artefacts with. In streaming mode there is no in-memory model: the runners stream
    block by block, the dense vLLM baseline is the source checkpoint itself, and torch latency is not measured."""

    reference: Runner  # the pruned model with the export dtype's weights, fp32 compute
    dense: Runner  # the dense model, same rounding
    vocab: int
    pruned_model: object | None = None
    dense_model: object | None = None
    dense_checkpoint: object | None = None  # a dense HF directory: the baseline for runtimes that serve one
    pruned_checkpoint: object | None = None  # streaming: the pruned HF directory written while pruning
    dense_bytes: dict = None  # format -> bytes of the dense model in that format's dtype
    batch_size: int = 8  # torch forwards


def time_pair(dense: Runner, sparse: Runner, vocab: int, settings, seed: int) -> dict:
    """latency.compare_runtime on random prompts of settings.prompt_len tokens at each of settings.batches. Adds the
    kernel path that served the sparse side's largest packed layer (where it has one) at each batch, decode and
    prefill."""
    result = latency.compare_runtime(dense, sparse, _prompts(vocab, settings, seed), settings.new_tokens,
                                     settings.warmup, settings.iters)
    rows = {f"{phase} b{b}": b * (settings.prompt_len if phase == "prefill" else 1)
            for b in settings.batches for phase in ("prefill", "decode")}
    paths = sparse.kernel_paths(rows)
    if paths:
        result["kernel_paths"] = paths
    return result


def _prompts(vocab: int, settings, seed: int) -> dict:
    import torch

    generator = torch.Generator().manual_seed(seed)
    return {b: torch.randint(0, vocab, (b, settings.prompt_len), generator=generator) for b in settings.batches}


def device_description() -> dict:
    import os
    import platform
    import sys

    import torch

    info = {"torch_threads": torch.get_num_threads(), "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count()}
    if torch.cuda.is_available():
        info["cuda"] = torch.cuda.get_device_name(0)
    if "absorbdeploy.vllm_runner" in sys.modules:  # vLLM binds its engine's threads itself: say to which cores
        info["vllm_cpu_omp_threads_bind"] = os.environ.get(
            "VLLM_CPU_OMP_THREADS_BIND", "auto (vLLM's default: one core per rank reserved for its scheduler)")
    kernels = sys.modules.get("absorbdeploy.sparse.kernels")
    if kernels is not None:  # the bitmask format ran: which kernel backend and ISA path served it
        info["bitmask_kernel"] = {"backend": kernels.ensure_loaded(), "path": kernels.active_path()}
    return info


def _max_len(v) -> int:
    return max(v.seqlen, v.latency.prompt_len + v.latency.new_tokens) + 8


def entries(artefacts: dict) -> dict:
    """What gets scored: {name: (format, runtime name)} for every artefact in every runtime of its format that is
    installed; an artefact's own runtime keeps the format's name, another one is "<format> (<runtime>)"."""
    import importlib.util

    from absorbdeploy import exporters

    found = {}
    for fmt in artefacts:
        for i, (runtime, entry) in enumerate(exporters.get(fmt).RUNTIMES.items()):
            if all(importlib.util.find_spec(m) is not None for m in entry.modules):
                found[fmt if i == 0 else f"{fmt} ({runtime})"] = (fmt, runtime)
    return found


def validate_exports(subjects: Subjects, tokenizer, artefacts: dict, specs: dict, windows, v, seed: int, workdir,
                     progress) -> dict:
    """Reload every artefact in each of its runtimes and score it; with latency on, also score and time the dense model
    there (one dense baseline per runtime, shared). `specs` are the artefacts' ExportSpecs (dense baselines are
    exported with the same ones), `v` the recipe's validate section. Results are keyed as `entries` names them.

    Order matters: runtimes start first (a vLLM engine takes ~30 s and warms up while torch computes the reference),
    and timing waits until the engines it uses are up, so no start-up competes with a timed run. Timing goes one
    engine at a time (`_time_engine`): the scoring runners of the others are closed, and an engine never holds more
    runners than its dense baseline plus its timed artefacts (three vLLM engines, each a few GiB, not five).
    """
    import dataclasses
    import shutil

    from absorbdeploy import exporters

    options = exporters.RuntimeOptions(v.runtime_dtype, _max_len(v))
    scored = entries(artefacts)
    runners, baseline_runners, dense_for, results = {}, {}, {}, {}
    timing = {}  # timed name -> its dense baseline's key (one engine: timed together, `_time_engine`)
    try:
        for name, (fmt, runtime) in scored.items():
            module, opts = exporters.get(fmt), dataclasses.replace(options, name=runtime)
            try:
                if subjects.pruned_model is None and module.STREAM_BY_TENSORS:
                    continue  # streaming: compared tensor by tensor below, never loaded whole
                runners[name] = module.load(artefacts[fmt].path, opts)
                if v.latency.enabled and module.TIMED:
                    engine = module.RUNTIMES[runtime].engine
                    key = engine if module.SERVES_CHECKPOINT else name  # one plain-checkpoint baseline per engine
                    if key not in baseline_runners:
                        baseline = _dense_baseline(module, subjects, tokenizer, specs[fmt], workdir / key.replace(" ", "_"))
                        baseline_runners[key] = None if baseline is None else (
                            module.load(baseline[0], opts), baseline[1], baseline[0], module, opts.name)
                    if baseline_runners[key] is not None:
                        dense_for[name] = baseline_runners[key]
                        timing[name] = key
            except Exception as e:
                results[name] = _failure(runtime, e)
        ref = compare.reference(subjects.reference, windows, v.compare_windows)
        dense_lp = subjects.dense.score(windows).target_logprobs
        dense_ppl, dense_bad = compare.finite_perplexity(dense_lp), compare.nonfinite(dense_lp)
        runtimes = {"torch": {"dense_ppl": dense_ppl, "sparse_ppl": ref.ppl, "ppl_ratio": compare.ratio(ref.ppl, dense_ppl)}}
        progress.log(f"    torch: dense PPL {compare.show(dense_ppl)}, pruned PPL {compare.show(ref.ppl)}")
        quantized_refs = {}  # values dtype -> the pruned model's reference with those values, decoded
        for name, (fmt, _) in scored.items():
            if name in results:
                continue
            try:
                values = getattr(exporters.get(fmt), "quantized_values", lambda spec: None)(specs[fmt])
                activations = getattr(exporters.get(fmt), "quantized_activations", lambda spec: None)(specs[fmt])
                scheme = (values, activations)
                if values and subjects.pruned_model is not None and scheme not in quantized_refs:
                    quantized_refs[scheme] = compare.quantized_reference(
                        subjects.pruned_model, specs[fmt].prunable, values, specs[fmt].dtype, subjects.reference,
                        windows, v.compare_windows, activations)
                results[name] = _score_artefact(exporters.get(fmt), runners.get(name), artefacts[fmt].path, subjects,
                                                quantized_refs.get(scheme, ref), windows, dense_ppl,
                                                dense_for.get(name), runtimes, values and (values, specs[fmt].prunable))
                if values:  # streaming compares tensors only: a quantized model's PPL is then not measured
                    ppl = results[name]["ppl"] if name in runners else None
                    if activations:
                        results[name]["reference_ppl"] = quantized_refs[scheme].ppl if scheme in quantized_refs else None
                    results[name].update(values=values, unquantized_ppl=ref.ppl, ppl=ppl,
                                         ppl_ratio=compare.ratio(ppl, results[name]["dense_ppl"]),
                                         quantization_ppl_ratio=compare.ratio(ppl, ref.ppl))
            except Exception as e:
                results[name] = _failure(scored[name][1], e)
        if v.latency.enabled:
            for name in runners:  # not timed (or failed): free its memory before other engines start
                if name not in timing or "error" in results[name]:
                    runners[name].close()
            if subjects.pruned_model is not None:
                batch, rd = subjects.batch_size, v.runtime_dtype
                live = {("dense", rd): TorchRunner(subjects.dense_model, batch),
                        ("torch", rd): TorchRunner(subjects.pruned_model, batch)}
                runtimes["torch"].update(_time_engine(None, ["torch"], [rd], live, subjects.vocab, v.latency, seed)["torch"])
            for key in dict.fromkeys(timing.values()):  # one engine at a time, its scoring runners handed over
                members = [n for n in timing if timing[n] == key and "error" not in results[n]]
                if not members:
                    continue
                _, _, dense_path, module, dense_runtime = baseline_runners[key]
                paths = {"dense": dense_path, **{n: artefacts[scored[n][0]].path for n in members}}
                opened = {"dense": baseline_runners[key][0], **{n: runners[n] for n in members}}
                dtypes = sorted(v.latency.dtypes, key=lambda d: d != options.dtype) if module.CHOOSES_DTYPE else [options.dtype]

                def open_runner(side, dtype, module=module, paths=paths, dense_runtime=dense_runtime):
                    """The dense baseline by the module that opened it, a member by its own format's, in `dtype`."""
                    fmt, runtime = (None, dense_runtime) if side == "dense" else scored[side]
                    kv = options.kv_cache_gib if dtype == options.dtype else 1  # timing needs little KV cache
                    return (module if fmt is None else exporters.get(fmt)).load(
                        paths[side], dataclasses.replace(options, dtype=dtype, kv_cache_gib=kv, name=runtime))

                live = {(side, options.dtype): r for side, r in opened.items()}
                timed = _time_engine(open_runner, members, dtypes, live, subjects.vocab, v.latency, seed)
                for name, outcome in timed.items():
                    runtimes[runners[name].runtime].update(outcome)
                    if "latency_error" in outcome:
                        progress.log(f"    {name}: latency not measured: {outcome['latency_error']}")
    finally:
        for r in [*runners.values(), *(b[0] for b in baseline_runners.values() if b is not None)]:
            r.close()
        shutil.rmtree(workdir, ignore_errors=True)
    for name in scored:
        result = results[name]
        if "error" in result:
            progress.log(f"    {name}: RELOAD FAILED: {result['error']}")
        else:
            label = name if name != scored[name][0] else f"{name} ({result['runtime']})"
            progress.log(f"    {label}: PPL {compare.show(result['ppl'])} (dense "
                         f"{compare.show(result['dense_ppl'])}, {result['dense_runtime']}), top-1 "
                         f"{compare.show(result['top1_agreement'], '.4f')}, max diff "
                         f"{compare.show(compare.checked_diff(result), '.2e')}"
                         + (f" (W8A8: gated on PPL against its reference's {compare.show(result['reference_ppl'])})"
                            if result.get("activations") and result.get("reference_ppl") else ""))
    ordered = {name: results[name] for name in scored}
    from absorbdeploy import zeroshot

    if subjects.pruned_model is not None:
        zero_shot = zeroshot.compare(subjects.dense_model, subjects.pruned_model, tokenizer, v.zero_shot)
    else:
        zero_shot = {"status": "skipped", "reason": "streaming mode: the model is never whole in memory"}
    gates = compare.torch_verdicts(ref.nonfinite, dense_bad) + compare.gate_verdicts(v.gates, ordered)
    return {"dense_ppl": dense_ppl, "reference_ppl": ref.ppl, "artefacts": ordered, "runtimes": runtimes, "gates": gates,
            "device": device_description(), "zero_shot": zero_shot, "dense_bytes": subjects.dense_bytes or {},
            "entries": {name: fmt for name, (fmt, _) in scored.items()}}


def _time_engine(open_runner, members: list[str], dtypes: list[str], live: dict, vocab: int, settings, seed: int) -> dict:
    """{member: {"latency": ...}} for each sparse member of one engine, timed against the shared dense baseline by
    latency.time_engine (each side in its fastest of `dtypes`, at most len(members) + 1 runners open; it closes
    `live`), or {member: {"latency_error": ...}} for all of them when timing fails: timing is a measurement, not a
    gate."""
    try:
        timed = latency.time_engine(open_runner, ["dense", *members], dtypes, live,
                                    lambda dense, sparse: time_pair(dense, sparse, vocab, settings, seed),
                                    _prompts(vocab, settings, seed)[min(settings.batches)], settings.new_tokens)
        return {name: {"latency": result} for name, result in timed.items()}
    except Exception as e:
        return {name: {"latency_error": _failure(name, e)["error"]} for name in members}


def _dense_baseline(module, subjects: Subjects, tokenizer, spec, folder):
    """(path, bytes) of the dense model in this format, or None where there is none to time against."""
    import dataclasses

    if subjects.dense_model is not None:  # the dense model as a plain checkpoint where the runtime serves one
        dense_spec = dataclasses.replace(spec, sidecar={"baseline": "dense"}, streamed=None, checkpoint=None)
        if module.SERVES_CHECKPOINT:
            export_files.write_checkpoint(subjects.dense_model, tokenizer, folder, dense_spec)
            return str(folder), sum(export_files.list_files(folder).values())
        artefact = module.export(subjects.dense_model, tokenizer, folder, dense_spec)
        return artefact.path, artefact.bytes
    if module.SERVES_CHECKPOINT and subjects.dense_checkpoint is not None:
        files = export_files.list_files(subjects.dense_checkpoint)
        return str(subjects.dense_checkpoint), sum(files.values())
    return None


def tensors_match(shards, checkpoint, quantized=None) -> bool:
    """Every tensor of `shards` (a format's `tensors`) bit-identical to the HF checkpoint's, and none missing; one
    shard in memory at a time. `quantized` = (values, prunable names): those tensors are compared with the checkpoint's
    quantized and decoded (codec.quantize_values), as the format stores them."""
    import torch

    from absorbdeploy.checkpoint import ShardIndex
    from absorbdeploy.sparse.codec import quantize_values

    index, seen = ShardIndex(Path(checkpoint)), 0
    for shard in shards:
        reference = index.read(list(shard))
        for name in set(quantized[1] if quantized else ()) & set(reference):
            q, scales = quantize_values(reference[name])
            reference[name] = q.float() * scales.unsqueeze(1)
        if any(not torch.equal(shard[k], reference[k]) for k in shard):
            return False
        seen += len(shard)
    return seen == len(index.map)


def _score_artefact(module, runner, path, subjects: Subjects, ref, windows, dense_ppl, dense, runtimes,
                    quantized=None) -> dict:
    if runner is None:  # streaming: the stored tensors are compared with the pruned checkpoint, tensor by tensor
        exact = tensors_match(module.tensors(path), subjects.pruned_checkpoint, quantized)
        name = Path(subjects.pruned_checkpoint).name
        result = {"runtime": f"decoder (tensors vs {name}/)", "ppl": ref.ppl, "top1_agreement": 1.0 if exact else 0.0,
                  "max_abs_logprob_diff": 0.0 if exact else float("inf"), "max_abs_logit_diff": 0.0 if exact else float("inf"),
                  "logit_metric": f"every decoded tensor bit-identical to {name}/ (the model is too large to run whole)"}
    else:
        result = {"runtime": runner.runtime, **compare.compare(runner, ref, windows),
                  "resident_weight_bytes": runner.resident_weight_bytes()}
    described = module.describe(path)
    result["audit"] = described["audit"]
    result.update({k: described[k] for k in ("values", "activations", "linear_bytes_per_weight") if k in described})
    result["dense_ppl"], result["dense_runtime"] = dense_ppl, "torch"
    if dense is not None:
        dense_lp = dense[0].score(windows).target_logprobs
        result["dense_ppl"], result["dense_nonfinite"] = compare.finite_perplexity(dense_lp), compare.nonfinite(dense_lp)
        result["dense_runtime"], result["dense_bytes"] = runner.runtime, dense[1]
        result["dense_resident_weight_bytes"] = dense[0].resident_weight_bytes()
        runtimes[runner.runtime] = {"dense_ppl": result["dense_ppl"], "sparse_ppl": result["ppl"]}
    result["ppl_ratio"] = compare.ratio(result["ppl"], result["dense_ppl"])
    if runner is not None and runner.runtime in runtimes:
        runtimes[runner.runtime]["ppl_ratio"] = result["ppl_ratio"]
    return result


def dense_weight_bytes(model, dtype: str) -> int:
    """Bytes of every parameter in `dtype` (tied ones once): what a dense checkpoint of this model weighs. Works on a
    meta-device skeleton too."""
    import torch

    itemsize = torch.empty(0, dtype=getattr(torch, dtype)).element_size()
    return sum(p.numel() for p in model.parameters()) * itemsize


def _failure(runtime: str, error: Exception) -> dict:
    """A reload or scoring that fails is a failed gate, reported with its cause, not a crash."""
    message = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return {"runtime": runtime, "error": f"{error.__class__.__name__}: {message}"}
