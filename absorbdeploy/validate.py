"""Stage 8, validate: reload every artefact in its own runtime and compare it with the in-memory pruned model.

The reference is the pruned model with the export dtype's weights, computed once in fp32 torch: next-token log-probs and
top-1 over all evaluation windows, full logits over the first `compare_windows`. Each artefact's runner is scored on the
same windows: perplexity, top-1 agreement, max |delta log-prob of the next token| and, where the runtime exposes logits,
max |delta logit| over the whole vocabulary. Per runtime the dense model is scored too (PPL ratio) and both are timed side
by side. Gates from the recipe turn the numbers into a verdict; a failed gate is exit code 1.
"""

import time
from dataclasses import dataclass
from pathlib import Path

from absorbdeploy import latency
from absorbdeploy.runners import Runner, TorchRunner, perplexity, target_logprobs


@dataclass
class Reference:
    target_lp: object  # [N, T-1]
    top1: object  # [N, T-1]
    logits: object  # [C, T, V] for the first C windows
    ppl: float | None  # None when any score is non-finite
    nonfinite: int = 0  # non-finite log-probs and logits


def nonfinite(*tensors) -> int:
    """How many entries of the given tensors (None skipped) are NaN or infinite."""
    import torch

    return sum(int((~torch.isfinite(t)).sum()) for t in tensors if t is not None)


def finite_perplexity(target_lp) -> float | None:
    """pydoc-v1 perplexity, or None when a log-prob is NaN/inf (a number computed from NaN is not a perplexity)."""
    return None if nonfinite(target_lp) else perplexity(target_lp)


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


def reference(runner: Runner, windows, compare_windows: int) -> Reference:
    """Scores of every window plus full logits of the first `compare_windows` (computed as one batch, so that a runtime
    given the same batch can match bit for bit)."""
    scores = runner.score(windows)
    first = min(compare_windows, windows.shape[0])
    logits = runner.logits(windows[:first]).float() if first else None
    bad = nonfinite(scores.target_logprobs, logits)
    return Reference(scores.target_logprobs, scores.top1, logits, None if bad else perplexity(scores.target_logprobs), bad)


def compare(runner: Runner, ref: Reference, windows) -> dict:
    """Scores of `runner` on `windows` against the reference."""
    start = time.perf_counter()
    scores = runner.score(windows)
    mine = runner.logits(windows[: ref.logits.shape[0]]).float() if runner.exposes_logits and ref.logits is not None else None
    result = {
        "nonfinite": nonfinite(scores.target_logprobs, mine),
        "ppl": None, "top1_agreement": None, "max_abs_logprob_diff": None, "max_abs_logit_diff": None,
        "logit_metric": "next-token log-prob (the runtime exposes log-probs, not logits)",
    }
    if mine is not None:
        result["logit_metric"] = f"logits over the full vocabulary, first {ref.logits.shape[0]} windows"
    if not result["nonfinite"] and not ref.nonfinite:  # comparisons with NaN would say nothing (or "agreement 1.0")
        result["ppl"] = perplexity(scores.target_logprobs)
        result["top1_agreement"] = float((scores.top1 == ref.top1).float().mean())
        result["max_abs_logprob_diff"] = float((scores.target_logprobs - ref.target_lp).abs().max())
        if mine is not None:
            result["max_abs_logit_diff"] = float((mine - ref.logits).abs().max())
    result["score_seconds"] = time.perf_counter() - start
    return result


def checked_diff(result: dict) -> float:
    """The number the max_abs_logit_diff gate reads: logits where the runtime has them, else next-token log-probs."""
    value = result.get("max_abs_logit_diff")
    return result.get("max_abs_logprob_diff") if value is None else value


def gate_verdicts(gates, artefacts: dict) -> list[dict]:
    """One verdict per (gate, artefact); `gates` is the recipe's validate.gates section, `artefacts` maps a name to its
    comparison dict (with ppl_ratio)."""
    verdicts = []
    for name, result in artefacts.items():
        if "error" in result:
            verdicts.append({"gate": "reload", "artefact": name, "value": None, "limit": None, "passed": False,
                             "detail": result["error"]})
            continue
        for what, count in (("", result.get("nonfinite", 0)), (" (dense baseline)", result.get("dense_nonfinite", 0))):
            if count:
                verdicts.append({"gate": "finite_scores", "artefact": name + what, "value": count, "limit": 0,
                                 "passed": False, "detail": f"{count} NaN/inf log-probs or logits in {result['runtime']}"})
        checks = [
            ("max_ppl_ratio", result.get("ppl_ratio"), gates.max_ppl_ratio, lambda v, lim: v <= lim),
            ("max_abs_logit_diff", checked_diff(result), gates.max_abs_logit_diff, lambda v, lim: v <= lim),
            ("min_top1_agreement", result.get("top1_agreement"), gates.min_top1_agreement, lambda v, lim: v >= lim),
        ]
        for gate, value, limit, ok in checks:
            if limit is None or value is None:
                continue
            verdicts.append({"gate": gate, "artefact": name, "value": value, "limit": limit, "passed": bool(ok(value, limit))})
    return verdicts


def time_pair(dense: Runner, sparse: Runner, vocab: int, settings, seed: int) -> dict:
    import torch

    generator = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, vocab, (1, settings.prompt_len), generator=generator)
    return latency.side_by_side(dense, sparse, prompt, settings.new_tokens, settings.warmup, settings.iters)


def device_description() -> dict:
    import os
    import platform
    import sys

    import torch

    info = {"torch_threads": torch.get_num_threads(), "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count()}
    if torch.cuda.is_available():
        info["cuda"] = torch.cuda.get_device_name(0)
    kernels = sys.modules.get("absorbdeploy.kernels")
    if kernels is not None:  # the bitmask format ran: which kernel backend and ISA path served it
        info["bitmask_kernel"] = {"backend": kernels.ensure_loaded(), "path": kernels.active_path()}
    return info


def _max_len(v) -> int:
    return max(v.seqlen, v.latency.prompt_len + v.latency.new_tokens) + 8


def validate_exports(subjects: Subjects, tokenizer, artefacts: dict, specs: dict, windows, v, seed: int, workdir,
                     progress) -> dict:
    """Reload every artefact in its runtime and score it; with latency on, also score and time the dense model there.
    `specs` are the artefacts' ExportSpecs (the dense baselines are exported with the same ones), `v` the recipe's
    validate section.

    Order matters: runtimes start first (a vLLM engine takes ~30 s and warms up while torch computes the reference),
    and all timing happens after every engine is up, so no start-up competes with a timed run.
    """
    import shutil

    from absorbdeploy import exporters

    runtime = exporters.RuntimeOptions(v.runtime_dtype, _max_len(v))
    runners, dense_runners, results = {}, {}, {}
    try:
        for fmt, artefact in artefacts.items():
            module = exporters.get(fmt)
            try:
                if subjects.pruned_model is None and module.STREAM_BY_TENSORS:
                    continue  # streaming: compared tensor by tensor below, never loaded whole
                runners[fmt] = module.load(artefact.path, runtime)
                if v.latency.enabled and module.TIMED:
                    baseline = _dense_baseline(module, subjects, tokenizer, specs[fmt], workdir / fmt)
                    if baseline is not None:
                        dense_runners[fmt] = (module.load(baseline[0], runtime), baseline[1])
            except Exception as e:
                results[fmt] = _failure(module, e)
        ref = reference(subjects.reference, windows, v.compare_windows)
        dense_lp = subjects.dense.score(windows).target_logprobs
        dense_ppl, dense_bad = finite_perplexity(dense_lp), nonfinite(dense_lp)
        runtimes = {"torch": {"dense_ppl": dense_ppl, "sparse_ppl": ref.ppl, "ppl_ratio": _ratio(ref.ppl, dense_ppl)}}
        progress.log(f"    torch: dense PPL {_show(dense_ppl)}, pruned PPL {_show(ref.ppl)}")
        for fmt in artefacts:
            if fmt in results:
                continue
            try:
                results[fmt] = _score_artefact(exporters.get(fmt), runners.get(fmt), artefacts[fmt].path, subjects, ref,
                                               windows, dense_ppl, dense_runners.get(fmt), runtimes)
            except Exception as e:
                results[fmt] = _failure(exporters.get(fmt), e)
        if v.latency.enabled:
            if subjects.pruned_model is not None:
                batch = subjects.batch_size
                runtimes["torch"]["latency"] = time_pair(TorchRunner(subjects.dense_model, batch),
                                                         TorchRunner(subjects.pruned_model, batch), subjects.vocab, v.latency, seed)
            for fmt, (dense_runner, _) in dense_runners.items():
                if "error" not in results[fmt]:
                    runtimes[runners[fmt].runtime]["latency"] = time_pair(dense_runner, runners[fmt], subjects.vocab, v.latency, seed)
    finally:
        for r in [*runners.values(), *(d for d, _ in dense_runners.values())]:
            r.close()
        shutil.rmtree(workdir, ignore_errors=True)
    for fmt in artefacts:
        result = results[fmt]
        if "error" in result:
            progress.log(f"    {fmt}: RELOAD FAILED: {result['error']}")
        else:
            progress.log(f"    {fmt} ({result['runtime']}): PPL {_show(result['ppl'])} (dense {_show(result['dense_ppl'])}, "
                         f"{result['dense_runtime']}), top-1 {_show(result['top1_agreement'], '.4f')}, "
                         f"max diff {_show(checked_diff(result), '.2e')}")
    ordered = {f: results[f] for f in artefacts}
    from absorbdeploy import zeroshot

    if subjects.pruned_model is not None:
        zero_shot = zeroshot.compare(subjects.dense_model, subjects.pruned_model, tokenizer, v.zero_shot)
    else:
        zero_shot = {"status": "skipped", "reason": "streaming mode: the model is never whole in memory"}
    return {"dense_ppl": dense_ppl, "reference_ppl": ref.ppl, "artefacts": ordered, "runtimes": runtimes,
            "gates": torch_verdicts(ref.nonfinite, dense_bad) + gate_verdicts(v.gates, ordered), "device": device_description(), "zero_shot": zero_shot,
            "dense_bytes": subjects.dense_bytes or {}}


def _dense_baseline(module, subjects: Subjects, tokenizer, spec, folder):
    """(path, bytes) of the dense model in this format, or None where there is none to time against."""
    import dataclasses

    from absorbdeploy import exporters

    if subjects.dense_model is not None:  # the dense model as a plain checkpoint where the runtime serves one
        dense_spec = dataclasses.replace(spec, sidecar={"baseline": "dense"}, streamed=None, checkpoint=None)
        if module.SERVES_CHECKPOINT:
            exporters.write_checkpoint(subjects.dense_model, tokenizer, folder, dense_spec)
            return str(folder), sum(exporters.list_files(folder).values())
        artefact = module.export(subjects.dense_model, tokenizer, folder, dense_spec)
        return artefact.path, artefact.bytes
    if module.SERVES_CHECKPOINT and subjects.dense_checkpoint is not None:
        files = exporters.list_files(subjects.dense_checkpoint)
        return str(subjects.dense_checkpoint), sum(files.values())
    return None


def tensors_match(shards, checkpoint) -> bool:
    """Every tensor of `shards` (a format's `tensors`) bit-identical to the HF checkpoint's, and none missing; one
    shard in memory at a time."""
    import torch

    from absorbdeploy.checkpoint import ShardIndex

    index, seen = ShardIndex(Path(checkpoint)), 0
    for shard in shards:
        reference = index.read(list(shard))
        if any(not torch.equal(shard[k], reference[k]) for k in shard):
            return False
        seen += len(shard)
    return seen == len(index.map)


def _score_artefact(module, runner, path, subjects: Subjects, ref, windows, dense_ppl, dense, runtimes) -> dict:
    if runner is None:  # streaming: the stored tensors are compared with the pruned checkpoint, tensor by tensor
        exact = tensors_match(module.tensors(path), subjects.pruned_checkpoint)
        name = Path(subjects.pruned_checkpoint).name
        result = {"runtime": f"decoder (tensors vs {name}/)", "ppl": ref.ppl, "top1_agreement": 1.0 if exact else 0.0,
                  "max_abs_logprob_diff": 0.0 if exact else float("inf"), "max_abs_logit_diff": 0.0 if exact else float("inf"),
                  "logit_metric": f"every decoded tensor bit-identical to {name}/ (the model is too large to run whole)"}
    else:
        result = {"runtime": runner.runtime, **compare(runner, ref, windows),
                  "resident_weight_bytes": runner.resident_weight_bytes()}
    result["audit"] = module.describe(path)["audit"]
    result["dense_ppl"], result["dense_runtime"] = dense_ppl, "torch"
    if dense is not None:
        dense_lp = dense[0].score(windows).target_logprobs
        result["dense_ppl"], result["dense_nonfinite"] = finite_perplexity(dense_lp), nonfinite(dense_lp)
        result["dense_runtime"], result["dense_bytes"] = runner.runtime, dense[1]
        result["dense_resident_weight_bytes"] = dense[0].resident_weight_bytes()
        runtimes[runner.runtime] = {"dense_ppl": result["dense_ppl"], "sparse_ppl": result["ppl"]}
    result["ppl_ratio"] = _ratio(result["ppl"], result["dense_ppl"])
    if runner is not None and runner.runtime in runtimes:
        runtimes[runner.runtime]["ppl_ratio"] = result["ppl_ratio"]
    return result


def _ratio(a, b):
    return None if a is None or not b else a / b


def _show(value, spec: str = ".3f") -> str:
    return "n/a (non-finite scores)" if value is None else format(value, spec)


def torch_verdicts(reference_nonfinite: int, dense_nonfinite: int) -> list[dict]:
    """The in-memory models themselves must score finitely, or no comparison against them means anything."""
    return [{"gate": "finite_scores", "artefact": what, "value": count, "limit": 0, "passed": False,
             "detail": f"{count} NaN/inf log-probs or logits from the {what}"}
            for what, count in (("in-memory pruned model (torch)", reference_nonfinite),
                                ("in-memory dense model (torch)", dense_nonfinite)) if count]


def dense_weight_bytes(model, dtype: str) -> int:
    """Bytes of every parameter in `dtype` (tied ones once): what a dense checkpoint of this model weighs. Works on a
    meta-device skeleton too."""
    import torch

    itemsize = torch.empty(0, dtype=getattr(torch, dtype)).element_size()
    return sum(p.numel() for p in model.parameters()) * itemsize


def _failure(module, error: Exception) -> dict:
    """A reload or scoring that fails is a failed gate, reported with its cause, not a crash."""
    message = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return {"runtime": module.RUNTIME, "error": f"{error.__class__.__name__}: {message}"}
