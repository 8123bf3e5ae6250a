"""Value and cross-field rules of a recipe (the part of validation that types alone cannot express).

Some defaults depend on other settings or on the model: a field left at `None` *follows* (`settle` fills it in and
says why when the result differs from its plain default), so changing one setting never makes a default contradict it.
A value the user (or a recipe file) gave explicitly is never changed: a contradiction between explicit values is
refused. `check` raises `UserError` on the first violation, naming the key, the value and what would be accepted.
"""

import dataclasses
import re
from dataclasses import dataclass
from typing import NamedTuple

from absorbdeploy.errors import UserError

from absorbdeploy.absorb import CORRECTIONS, DEFINITIONS
from absorbdeploy.allocate import ALLOCATORS
from absorbdeploy.exporters import FORMATS
from absorbdeploy.prune import PRUNERS
from absorbdeploy.update import UPDATES

DTYPES = ("float32", "bfloat16", "float16")
EXPORT_DTYPES = ("auto",) + DTYPES
VALUES = ("auto", "bf16", "fp16", "int8")  # export.values: the bitmask format's packed values
ACTIVATIONS = ("float", "int8")  # export.activations: the bitmask format's Linear inputs (int8: W8A8)
DEFAULT_SPARSITY, DEFAULT_SEQLEN, DEFAULT_PROBE_SAMPLES, DEFAULT_MIN, DEFAULT_MAX = 0.5, 512, 4, 0.05, 0.95


@dataclass(frozen=True)
class ModelFacts:
    """What preflight knows of the model before loading it (both optional)."""

    context: int | None = None  # max_position_embeddings
    dtype: str | None = None  # float32 | bfloat16 | float16: the dtype of the source's floating-point weights


def settle(r, facts: ModelFacts | None = None):
    """Fill every following default (`None`) from the settings it depends on; returns (recipe, notes), one note per
    default that followed to something other than its plain value. Settling a settled recipe changes nothing."""
    facts = facts or ModelFacts()
    c, p, a, ab, e, v = r.calibration, r.prune, r.allocation, r.absorption, r.export, r.validate
    notes: list[str] = []

    def follow(value, plain, followed, key: str, why: str):
        if value is not None:
            return value
        if followed != plain:
            shown = str(followed).lower() if isinstance(followed, bool) else format(followed, "g" if isinstance(followed, float) else "")
            notes.append(f"{key} = {shown}: {why}")
        return followed

    short = facts.context if facts.context and facts.context < DEFAULT_SEQLEN else DEFAULT_SEQLEN
    why_context = f"the model's context ({facts.context} tokens) is shorter than {DEFAULT_SEQLEN}"
    seqlen = follow(c.seqlen, DEFAULT_SEQLEN, short, "calibration.seqlen", why_context)
    eval_seqlen = follow(v.seqlen, DEFAULT_SEQLEN, short, "validate.seqlen", why_context)
    nm = p.structure
    fixed = nm.n / nm.m if nm else DEFAULT_SPARSITY
    sparsity = follow(p.sparsity, DEFAULT_SPARSITY, fixed, "prune.sparsity", f"prune.structure {nm} fixes it")
    low = follow(a.min, DEFAULT_MIN, min(DEFAULT_MIN, sparsity), "allocation.min", "prune.sparsity is lower")
    high = follow(a.max, DEFAULT_MAX, max(DEFAULT_MAX, sparsity), "allocation.max", "prune.sparsity is higher")
    samples = follow(ab.probe_samples, DEFAULT_PROBE_SAMPLES, min(DEFAULT_PROBE_SAMPLES, c.nsamples),
                     "absorption.probe_samples", f"calibration.nsamples is {c.nsamples}")
    probe_seqlen = ab.probe_seqlen if ab.probe_seqlen is not None else seqlen
    dtype = e.dtype if e.dtype != "auto" else ("float16" if facts.dtype == "float16" else "bfloat16")
    return dataclasses.replace(
        r, calibration=dataclasses.replace(c, seqlen=seqlen), prune=dataclasses.replace(p, sparsity=sparsity),
        allocation=dataclasses.replace(a, min=low, max=high),
        absorption=dataclasses.replace(ab, probe_samples=samples, probe_seqlen=probe_seqlen),
        export=dataclasses.replace(e, dtype=dtype), validate=dataclasses.replace(v, seqlen=eval_seqlen),
    ), notes



class NM(NamedTuple):
    """An N:M structure: N weights pruned in every M consecutive inputs of a row (2:4 = 50 %)."""

    n: int
    m: int

    def __str__(self) -> str:
        return f"{self.n}:{self.m}"


def parse_nm(structure) -> NM | None:
    """'unstructured' (or None) -> None; 'N:M' -> NM(N, M). The one place a structure is parsed."""
    if structure is None or structure == "unstructured":
        return None
    if isinstance(structure, NM):
        return structure
    match = re.fullmatch(r"(\d+):(\d+)", structure) if isinstance(structure, str) else None
    if not match:
        raise UserError(f"prune.structure must be 'unstructured' or 'N:M' such as '2:4', got {structure!r}")
    n, m = int(match[1]), int(match[2])
    if not 0 < n < m:
        raise UserError(f"prune.structure {structure}: need 0 < N < M (N pruned of every M inputs)")
    return NM(n, m)


def structure_name(nm: NM | None) -> str:
    return str(nm) if nm else "unstructured"


def check(r) -> None:
    """Value and cross-field rules of a recipe as given (its following defaults settled without model facts); raises
    UserError on the first violation."""
    check_settled(settle(r)[0])


def check_settled(r) -> None:
    """The rules of `check` on a recipe that `settle` has already filled in (preflight settles it against the model)."""
    c, p, a, ab, e, v = r.calibration, r.prune, r.allocation, r.absorption, r.export, r.validate
    _choice("device", r.device, ("auto", "cpu", "cuda"))
    _choice("calibration.statistics", c.statistics, ("sequential", "dense"))
    _at_least("calibration.nsamples", c.nsamples, 1)
    _at_least("calibration.seqlen", c.seqlen, 2)
    _at_least("calibration.batch_size", c.batch_size, 1)
    _at_least("calibration.draw", c.draw, 0)
    _choice("prune.method", p.method, tuple(PRUNERS))
    if not 0.0 <= p.sparsity < 1.0:
        raise UserError(f"prune.sparsity must be in [0, 1), got {p.sparsity}")
    nm = p.structure
    if nm is not None:
        if abs(p.sparsity - nm.n / nm.m) > 1e-9:
            raise UserError(f"prune.structure {nm} fixes the sparsity at {nm.n / nm.m:g}; set prune.sparsity: {nm.n / nm.m:g}")
        if ALLOCATORS[a.method].varies or ab.enabled:
            raise UserError(f"prune.structure {nm} needs allocation.method: uniform and absorption.enabled: false (N:M fixes every block's sparsity)")
    _at_least("prune.sparsegpt.blocksize", p.sparsegpt.blocksize, 1)
    if not p.sparsegpt.dampening > 0:
        raise UserError(f"prune.sparsegpt.dampening must be > 0, got {p.sparsegpt.dampening}")
    _choice("prune.update", p.update, tuple(UPDATES))
    _at_least("prune.admm.iterations", p.admm.iterations, 1)
    _at_least("prune.admm.stage", p.admm.stage, 1)
    if not (p.admm.rho > 0 and p.admm.growth >= 1 and p.admm.dampening > 0):
        raise UserError("prune.admm needs rho > 0, growth >= 1 and dampening > 0")
    _at_least("prune.reconstruct.steps", p.reconstruct.steps, 0)
    _at_least("prune.reconstruct.batch_size", p.reconstruct.batch_size, 1)
    if not p.reconstruct.lr > 0:
        raise UserError(f"prune.reconstruct.lr must be > 0, got {p.reconstruct.lr}")
    if p.reconstruct.steps and c.statistics == "dense":
        raise UserError("prune.reconstruct needs calibration.statistics: sequential (it fits each block on its pruned inputs)")
    _choice("allocation.method", a.method, tuple(ALLOCATORS))
    if not 0.0 <= a.min < a.max < 1.0:
        raise UserError(f"allocation.min and allocation.max need 0 <= min < max < 1, got min {a.min}, max {a.max}")
    if nm is None and not a.min <= p.sparsity <= a.max:
        raise UserError(f"prune.sparsity {p.sparsity} lies outside [allocation.min, allocation.max] = [{a.min}, {a.max}]; widen the range")
    if not a.owl.m > 0 or not a.owl.lam >= 0:
        raise UserError("allocation.owl needs m > 0 and lam >= 0")
    if not 0.0 <= a.alpha.eps < 1.0:
        raise UserError(f"allocation.alpha.eps must be in [0, 1), got {a.alpha.eps}")
    if not a.dlp.alpha >= 0:
        raise UserError(f"allocation.dlp.alpha must be >= 0, got {a.dlp.alpha}")
    if a.atp.beta is not None and a.atp.beta < 0:
        raise UserError(f"allocation.atp.beta must be >= 0 or null, got {a.atp.beta}")
    _choice("absorption.definition", ab.definition, tuple(DEFINITIONS))
    _choice("absorption.mode", ab.mode, ("auto", *CORRECTIONS))
    _choice("absorption.perturbation", ab.perturbation, ("pruning", "gaussian"))
    if not ab.strength >= 0:
        raise UserError(f"absorption.strength must be >= 0, got {ab.strength}")
    if not (ab.eps > 0 and ab.eps_small > 0):
        raise UserError("absorption.eps and absorption.eps_small must be > 0")
    _at_least("absorption.iterations", ab.iterations, 1)
    _at_least("absorption.skip_tokens", ab.skip_tokens, 0)
    if ab.horizon is not None:
        _at_least("absorption.horizon", ab.horizon, 1)
    if ab.injection_stride is not None:
        _at_least("absorption.injection_stride", ab.injection_stride, 1)
    if ab.enabled:
        check_probe(r)
    for fmt in e.formats or ():
        _choice("export.formats", fmt, tuple(FORMATS))
    if e.formats is not None and len(set(e.formats)) != len(e.formats):
        raise UserError(f"export.formats lists a format twice: {list(e.formats)}")
    _choice("export.dtype", e.dtype, EXPORT_DTYPES)
    _choice("export.values", e.values, VALUES)  # the bitmask format's; the others store export.dtype
    _choice("export.activations", e.activations, ACTIVATIONS)
    if e.activations == "int8" and e.values != "int8":
        raise UserError(f"export.activations: int8 (W8A8) needs export.values: int8, got {e.values!r} (int8 "
                        "activations multiply int8 weights; set both, e.g. --set export.values=int8)")
    _choice("export.onnx.dtype", e.onnx.dtype, ("float32", "float16"))
    _choice("export.onnx.sparse", e.onnx.sparse, ("auto", "always", "never"))
    if not 18 <= e.onnx.opset <= 23:
        raise UserError(f"export.onnx.opset must be in [18, 23], got {e.onnx.opset}")
    if not re.fullmatch(r"\d+(\.\d+)?\s*(B|KB|MB|GB|KiB|MiB|GiB)", e.max_shard_size):
        raise UserError(f"export.max_shard_size must look like '5GB' or '500MB', got {e.max_shard_size!r}")
    if v.eval_windows is not None:
        _at_least("validate.eval_windows", v.eval_windows, 1)
    _at_least("validate.seqlen", v.seqlen, 2)
    _at_least("validate.compare_windows", v.compare_windows, 0)
    _choice("validate.runtime_dtype", v.runtime_dtype, DTYPES)
    lat = v.latency
    _at_least("validate.latency.warmup", lat.warmup, 0)
    _at_least("validate.latency.iters", lat.iters, 1)
    _at_least("validate.latency.prompt_len", lat.prompt_len, 1)
    _at_least("validate.latency.new_tokens", lat.new_tokens, 1)
    if not lat.batches:
        raise UserError("validate.latency.batches must list at least one batch size, e.g. [1, 8]")
    for batch in lat.batches:
        _at_least("validate.latency.batches[]", batch, 1)
    if not lat.dtypes:
        raise UserError("validate.latency.dtypes must list at least one of " + ", ".join(DTYPES))
    for dtype in lat.dtypes:
        _choice("validate.latency.dtypes[]", dtype, DTYPES)
    g = v.gates
    if g.max_ppl_ratio is not None and not g.max_ppl_ratio > 0:
        raise UserError(f"validate.gates.max_ppl_ratio must be > 0 or null, got {g.max_ppl_ratio}")
    if g.max_abs_logit_diff is not None and not g.max_abs_logit_diff >= 0:
        raise UserError(f"validate.gates.max_abs_logit_diff must be >= 0 or null, got {g.max_abs_logit_diff}")
    if g.min_top1_agreement is not None and not 0 <= g.min_top1_agreement <= 1:
        raise UserError(f"validate.gates.min_top1_agreement must be in [0, 1] or null, got {g.min_top1_agreement}")
    if g.max_quantization_ppl_ratio is not None and not g.max_quantization_ppl_ratio > 0:
        raise UserError(f"validate.gates.max_quantization_ppl_ratio must be > 0 or null, got "
                        f"{g.max_quantization_ppl_ratio}")
    if g.w8a8_ppl_tolerance is not None and not g.w8a8_ppl_tolerance > 0:
        raise UserError(f"validate.gates.w8a8_ppl_tolerance must be > 0 or null, got {g.w8a8_ppl_tolerance}")
    _choice("streaming.mode", r.streaming.mode, ("auto", "on", "off"))
    if r.streaming.memory_budget_gb is not None and not r.streaming.memory_budget_gb > 0:
        raise UserError(f"streaming.memory_budget_gb must be > 0 or null, got {r.streaming.memory_budget_gb}")


def _choice(name: str, value, choices) -> None:
    if value not in choices:
        raise UserError(f"{name} must be one of {', '.join(choices)}; got {value!r}")


def _at_least(name: str, value: int, low: int) -> None:
    if value < low:
        raise UserError(f"{name} must be >= {low}, got {value}")


def check_probe(r) -> None:
    """The probe's windows are a prefix of the calibration windows, so they must fit inside them."""
    c, ab = r.calibration, r.absorption
    if not 1 <= ab.probe_samples <= c.nsamples:
        raise UserError(f"absorption.probe_samples must be in [1, calibration.nsamples = {c.nsamples}], got {ab.probe_samples}")
    if not ab.skip_tokens < ab.probe_seqlen <= c.seqlen:
        raise UserError(f"absorption.probe_seqlen must be in ({ab.skip_tokens}, calibration.seqlen = {c.seqlen}], got {ab.probe_seqlen}")
