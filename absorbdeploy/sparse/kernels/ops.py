"""`torch.ops.absorbdeploy.bitmask_linear`: y = x @ W^T (+ bias) with W in the bitmask layout of
sparse/codec.py::compress_bitmask, its pure-torch reference, and the lazy loading that defines it.

The op is defined on the first `ensure_loaded()` (which `bitmask_linear` calls): by the compiled C++ library when it
builds, otherwise, after one warning, in Python with the reference as its CPU kernel, so callers always use the same
op. A fake (meta) implementation is registered either way for torch.compile, and an autograd rule
(torch.library.register_autograd): gradients flow to x and the bias, never to the packed weights, which are frozen.
"""

import os
import threading
import warnings

import torch

from absorbdeploy.sparse.codec import unpack_bits

SCHEMA = ("(Tensor x, Tensor values, Tensor bitmask, Tensor row_offsets, int in_features, Tensor? bias, "
          "Tensor? scales=None, bool quantize_x=False) -> Tensor")
ISA_VARIABLE = "ABSORBDEPLOY_KERNEL_ISA"
_state: dict = {}
_lock = threading.Lock()


def bitmask_linear_reference(x, values, bitmask, row_offsets, in_features: int, bias=None, scales=None,
                             quantize_x: bool = False):
    """y = x @ W^T (+ bias) by decoding W densely with torch ops; needs no compiler.

    x [..., in_features] fp32/bf16/fp16; values [nnz] bf16/fp16, or int8 with `scales` fp32 [out] (W[r] = scales[r] *
    q[r], symmetric per output channel: codec.quantize_values); bitmask uint8 [out, ceil(in_features / 8)];
    row_offsets int64 [out] (implied by the bitmask, so unused here); bias [out] or None. `quantize_x` (int8 values
    only: W8A8) quantizes x per token first (`quantize_tokens`) and sums x_q * q exactly (fp64), y = x_scale * scale
    * sum. Returns [..., out] in x's dtype, computed in fp32. Raises RuntimeError if the bitmask's popcount differs
    from nnz, int8 values come without scales, or quantize_x comes without int8 values.
    """
    if quantize_x:
        if values.dtype != torch.int8:
            raise RuntimeError("bitmask_linear: quantize_x (W8A8) needs int8 values")
        x_q, x_scales = quantize_tokens(x.reshape(-1, in_features))
        q = _dense_fp32(values, bitmask, in_features, torch.ones_like(scales)).double()
        y = ((x_q.double() @ q.T).float() * x_scales * scales.float()).reshape(*x.shape[:-1], -1)
    else:
        y = x.float() @ _dense_fp32(values, bitmask, in_features, scales).T
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


def quantize_tokens(x):
    """Dynamic symmetric per-token int8 of x [tokens, in] (the W8A8 activations): scales fp32 [tokens, 1] = max |x[t]|
    / 127 (1 for an all-zero token), x_q int8 = round(x / scale) in [-127, 127], round half to even. The C++ kernel
    quantizes in one pass of its own (w8a8.h quantize_rows) with the same IEEE operations per element (fp32 max, one
    division by 127, one division per element, nearbyint), so both give the same x_q (tests/unit/sparse/kernels/
    test_w8a8.py: the fused path's y equals the reference's bit for bit)."""
    xf = x.float()
    scales = xf.abs().amax(1, keepdim=True) / 127.0
    scales = scales.masked_fill(scales == 0, 1.0)
    return (xf / scales).round().clamp(-127, 127).to(torch.int8), scales


def _dense_fp32(values, bitmask, in_features: int, scales=None):
    """W [out, in_features] in fp32 from the packed values and the bitmask (int8 values times their row's scale)."""
    if (values.dtype == torch.int8) != (scales is not None):
        raise RuntimeError("bitmask_linear: int8 values need their scales and only they take scales")
    dense = torch.zeros(bitmask.shape[0], in_features, dtype=torch.float32, device=values.device)
    dense[unpack_bits(bitmask, in_features)] = values.float()
    return dense if scales is None else dense * scales.float().unsqueeze(1)


def _fake(x, values, bitmask, row_offsets, in_features, bias=None, scales=None, quantize_x=False):
    return x.new_empty((*x.shape[:-1], bitmask.shape[0]))


def _setup_context(ctx, inputs, output) -> None:
    x, values, bitmask, _, in_features, bias, *rest = inputs
    ctx.save_for_backward(values, bitmask, rest[0] if rest else None)
    ctx.in_features, ctx.x_dtype = in_features, x.dtype
    ctx.bias_dtype = None if bias is None else bias.dtype


def _backward(ctx, grad):
    """dL/dx = dL/dy @ W (W decoded densely in fp32, once per backward); dL/dbias = dL/dy summed over the batch."""
    values, bitmask, scales = ctx.saved_tensors
    grad_x = grad_bias = None
    if ctx.needs_input_grad[0]:
        grad_x = (grad.float() @ _dense_fp32(values, bitmask, ctx.in_features, scales)).to(ctx.x_dtype)
    if ctx.needs_input_grad[5]:
        grad_bias = grad.float().reshape(-1, grad.shape[-1]).sum(0).to(ctx.bias_dtype)
    return grad_x, None, None, None, None, grad_bias, None, None


def _check_no_forced_path() -> None:
    forced = os.environ.get(ISA_VARIABLE, "")
    if forced not in ("", "auto"):
        raise RuntimeError(f"{ISA_VARIABLE}={forced} asks for a compiled path, but the kernels are not built on this "
                           "machine (see the earlier warning); unset it to use the pure-torch reference")


def _reference_kernel(x, values, bitmask, row_offsets, in_features, bias=None, scales=None, quantize_x=False):
    _check_no_forced_path()
    return bitmask_linear_reference(x, values, bitmask, row_offsets, in_features, bias, scales, quantize_x)


def _define_in_python() -> None:
    torch.library.define("absorbdeploy::bitmask_linear", SCHEMA)
    torch.library.impl("absorbdeploy::bitmask_linear", "cpu", _reference_kernel)


def ensure_loaded() -> str:
    """Define the op once per process; returns its backend, "extension" or "reference".

    Builds the C++ kernels on first use (kernels/build.py). If that fails (no compiler, no ninja, a failed
    compile) warns once, saying why, and falls back to the reference.
    """
    if "backend" in _state:
        return _state["backend"]
    with _lock:
        if "backend" not in _state:
            from absorbdeploy.sparse.kernels import build

            try:
                build.load()
                _state["backend"] = "extension"
            except build.BuildError as e:
                warnings.warn(f"absorbdeploy kernels unavailable: {e}; absorbdeploy::bitmask_linear uses the slow "
                              "pure-torch reference", stacklevel=3)
                _define_in_python()
                _state["backend"] = "reference"
            torch.library.register_fake("absorbdeploy::bitmask_linear")(_fake)
            torch.library.register_autograd("absorbdeploy::bitmask_linear", _backward, setup_context=_setup_context)
        return _state["backend"]


def bitmask_linear(x, values, bitmask, row_offsets, in_features: int, bias=None, scales=None, quantize_x=False):
    """y = x @ W^T (+ bias) through torch.ops.absorbdeploy.bitmask_linear (loaded on first call).

    Shapes and dtypes as in `bitmask_linear_reference`; row_offsets must be the exclusive cumulative sum of the
    bitmask's per-row popcounts. Raises RuntimeError on malformed inputs or when ABSORBDEPLOY_KERNEL_ISA asks for a
    path this CPU lacks.
    """
    if not torch.compiler.is_compiling():
        ensure_loaded()
    return torch.ops.absorbdeploy.bitmask_linear(x, values, bitmask, row_offsets, in_features, bias, scales,
                                                 quantize_x)


def available_paths() -> list[str]:
    """ISA paths compiled in and supported by this CPU, best first (e.g. ["avx512", "avx2", "scalar"]); empty when
    the op runs on the reference."""
    if ensure_loaded() == "reference":
        return []
    return list(torch.ops.absorbdeploy.kernel_paths())


def active_path() -> str:
    """The path the next call takes under the current ABSORBDEPLOY_KERNEL_ISA: an ISA name or "reference".
    Raises RuntimeError when the variable asks for a path that is not available."""
    if ensure_loaded() == "reference":
        _check_no_forced_path()
        return "reference"
    return torch.ops.absorbdeploy.kernel_active_path()
