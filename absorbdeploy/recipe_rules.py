"""Value and cross-field rules of a recipe (the part of validation that types alone cannot express).

`check` raises `UserError` on the first violation, naming the key, the value and what would be accepted.
"""

import re

from absorbdeploy.errors import UserError

PRUNE_METHODS = ("magnitude", "wanda", "sparsegpt")
ALLOCATION_METHODS = ("uniform", "owl", "alpha", "dlp", "atp")
ABSORPTION_DEFINITIONS = ("gain", "composed", "margin")
ABSORPTION_MODES = ("auto", "additive", "multiplicative")
EXPORT_FORMATS = ("vllm", "compressed-safetensors", "onnx")
DTYPES = ("float32", "bfloat16", "float16")



def parse_nm(structure: str) -> tuple[int, int] | None:
    """'unstructured' -> None; 'N:M' -> (N, M) where N weights of every M consecutive inputs are pruned."""
    if structure == "unstructured":
        return None
    match = re.fullmatch(r"(\d+):(\d+)", structure)
    if not match:
        raise UserError(f"prune.structure must be 'unstructured' or 'N:M' such as '2:4', got {structure!r}")
    n, m = int(match[1]), int(match[2])
    if not 0 < n < m:
        raise UserError(f"prune.structure {structure}: need 0 < N < M (N pruned of every M inputs)")
    return n, m


def check(r) -> None:
    """Value and cross-field rules; raises UserError on the first violation."""
    c, p, a, ab, e, v = r.calibration, r.prune, r.allocation, r.absorption, r.export, r.validate
    _choice("device", r.device, ("auto", "cpu", "cuda"))
    _choice("calibration.statistics", c.statistics, ("sequential", "dense"))
    _at_least("calibration.nsamples", c.nsamples, 1)
    _at_least("calibration.seqlen", c.seqlen, 2)
    _at_least("calibration.batch_size", c.batch_size, 1)
    _at_least("calibration.draw", c.draw, 0)
    _choice("prune.method", p.method, PRUNE_METHODS)
    if not 0.0 <= p.sparsity < 1.0:
        raise UserError(f"prune.sparsity must be in [0, 1), got {p.sparsity}")
    nm = parse_nm(p.structure)
    if nm is not None:
        if abs(p.sparsity - nm[0] / nm[1]) > 1e-9:
            raise UserError(f"prune.structure {p.structure} fixes the sparsity at {nm[0] / nm[1]:g}; set prune.sparsity: {nm[0] / nm[1]:g}")
        if a.method != "uniform" or ab.enabled:
            raise UserError(f"prune.structure {p.structure} needs allocation.method: uniform and absorption.enabled: false (N:M fixes every block's sparsity)")
    _at_least("prune.sparsegpt.blocksize", p.sparsegpt.blocksize, 1)
    if not p.sparsegpt.dampening > 0:
        raise UserError(f"prune.sparsegpt.dampening must be > 0, got {p.sparsegpt.dampening}")
    _choice("allocation.method", a.method, ALLOCATION_METHODS)
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
    _choice("absorption.definition", ab.definition, ABSORPTION_DEFINITIONS)
    _choice("absorption.mode", ab.mode, ABSORPTION_MODES)
    _choice("absorption.perturbation", ab.perturbation, ("pruning", "gaussian"))
    if not ab.strength >= 0:
        raise UserError(f"absorption.strength must be >= 0, got {ab.strength}")
    if not (ab.eps > 0 and ab.eps_small > 0):
        raise UserError("absorption.eps and absorption.eps_small must be > 0")
    _at_least("absorption.iterations", ab.iterations, 1)
    _at_least("absorption.skip_tokens", ab.skip_tokens, 0)
    if ab.enabled:
        check_probe(r)
    for fmt in e.formats or ():
        _choice("export.formats", fmt, EXPORT_FORMATS)
    if e.formats is not None and len(set(e.formats)) != len(e.formats):
        raise UserError(f"export.formats lists a format twice: {list(e.formats)}")
    _choice("export.dtype", e.dtype, DTYPES)
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
    _choice("validate.vllm_dtype", v.vllm_dtype, DTYPES)
    lat = v.latency
    _at_least("validate.latency.warmup", lat.warmup, 0)
    _at_least("validate.latency.iters", lat.iters, 1)
    _at_least("validate.latency.prompt_len", lat.prompt_len, 1)
    _at_least("validate.latency.new_tokens", lat.new_tokens, 1)
    g = v.gates
    if g.max_ppl_ratio is not None and not g.max_ppl_ratio > 0:
        raise UserError(f"validate.gates.max_ppl_ratio must be > 0 or null, got {g.max_ppl_ratio}")
    if g.max_abs_logit_diff is not None and not g.max_abs_logit_diff >= 0:
        raise UserError(f"validate.gates.max_abs_logit_diff must be >= 0 or null, got {g.max_abs_logit_diff}")
    if g.min_top1_agreement is not None and not 0 <= g.min_top1_agreement <= 1:
        raise UserError(f"validate.gates.min_top1_agreement must be in [0, 1] or null, got {g.min_top1_agreement}")
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
