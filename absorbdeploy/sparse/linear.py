"""`BitmaskLinear`: an nn.Linear whose weight is held only in the bitmask layout and multiplied by our kernel.

Buffers (codec.parts_for the values dtype, as stored on disk): `compressed` [nnz] bf16/fp16 (or int8) non-zeros in
row-major order, `bitmask` uint8 [out, ceil(in/8)], `row_offsets` int64 [out], `shape` int64 [2], and for int8 values
`weight_scale` fp32 [out] (W[r] = weight_scale[r] * q[r]); `bias` [out] stays a float parameter. `forward` calls
torch.ops.absorbdeploy.bitmask_linear (kernels/), which never materialises a dense W for
decode-sized batches. Casting the module (`model.to(torch.float32)`, `.half()`) moves the packed values between devices
but never changes their dtype: they are the stored bytes, and the kernel accumulates in fp32 whatever x is.
"""

import math

import torch

from absorbdeploy.sparse.codec import SCALE_PART, decompress_bitmask, parts_for


class BitmaskLinear(torch.nn.Module):
    """y = x W^T (+ b) with W [out_features, in_features] held as bitmask + packed values (see module docstring)."""

    def __init__(self, in_features: int, out_features: int, nnz: int, bias: bool, values_dtype=torch.bfloat16,
                 device=None, quantize_x: bool = False):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.quantize_x = quantize_x  # W8A8: x quantized per token in the kernel (int8 values only)
        self.register_buffer("compressed", torch.empty(nnz, dtype=values_dtype, device=device))
        self.register_buffer("bitmask", torch.empty(out_features, math.ceil(in_features / 8), dtype=torch.uint8, device=device))
        self.register_buffer("row_offsets", torch.empty(out_features, dtype=torch.int64, device=device))
        self.register_buffer("shape", torch.tensor([out_features, in_features], dtype=torch.int64, device=device))
        self.parts = parts_for(str(values_dtype).removeprefix("torch."))
        self.register_buffer(SCALE_PART, torch.empty(out_features, dtype=torch.float32, device=device)
                             if SCALE_PART in self.parts else None)
        self.bias = torch.nn.Parameter(torch.empty(out_features, device=device), requires_grad=False) if bias else None
        self._planned: set = set()  # x dtypes whose kernel plan (kernels/tune.py) this module has ensured

    @classmethod
    def from_parts(cls, parts: dict, bias=None, quantize_x: bool = False) -> "BitmaskLinear":
        """From codec.compress_bitmask's dict (or the tensors read from disk)."""
        rows, columns = (int(v) for v in parts["shape"].reshape(-1))
        module = cls(columns, rows, parts["compressed"].numel(), bias is not None, parts["compressed"].dtype,
                     quantize_x=quantize_x)
        for name in module.parts:
            getattr(module, name).copy_(parts[name].reshape(getattr(module, name).shape))
        if bias is not None:
            module.bias.data.copy_(bias)
        return module

    def forward(self, x):
        from absorbdeploy.sparse.kernels import bitmask_linear, ensure_planned

        if x.dtype not in self._planned and not torch.compiler.is_compiling() and self.compressed.device.type == "cpu":
            ensure_planned(self.compressed, self.bitmask, self.row_offsets, self.in_features,
                           torch.int8 if self.quantize_x else x.dtype, self.weight_scale)
            self._planned.add(x.dtype)
        return bitmask_linear(x, self.compressed, self.bitmask, self.row_offsets, self.in_features, self.bias,
                              self.weight_scale, self.quantize_x)

    def dense_weight(self):
        """W [out, in] in the values' dtype, fp32 for int8 values (for densifying where the kernel does not run)."""
        parts = {n: getattr(self, n).cpu() for n in self.parts if n != "row_offsets"}
        return decompress_bitmask(parts).to(self.compressed.device)

    def packed_bytes(self) -> int:
        return sum(getattr(self, n).numel() * getattr(self, n).element_size() for n in self.parts)

    def _apply(self, fn, recurse=True):
        kept = {n: self._buffers.pop(n) for n in ("compressed", SCALE_PART) if self._buffers.get(n) is not None}
        try:
            super()._apply(fn, recurse)
        finally:  # a uint8 probe shows where fn moves tensors without the dtype cast it applies to floats
            device = fn(torch.empty(0, dtype=torch.uint8, device=kept["compressed"].device)).device
            self._buffers.update({n: t.to(device) for n, t in kept.items()})
        return self

    def extra_repr(self) -> str:
        density = self.compressed.numel() / max(self.in_features * self.out_features, 1)
        return (f"in_features={self.in_features}, out_features={self.out_features}, density={density:.3f}, "
                f"values={self.compressed.dtype}, bias={self.bias is not None}"
                + (", activations=int8 per token" if self.quantize_x else ""))


def densify(model) -> int:
    """Replace every BitmaskLinear of `model` by an nn.Linear holding the decoded weight, in the model's dtype (a
    transformers model's `dtype`, else the values' dtype, fp32 for int8 values); returns how many."""
    count = 0
    for name, module in list(model.named_modules()):
        if isinstance(module, BitmaskLinear):
            dtype = getattr(model, "dtype", None) or (torch.float32 if module.weight_scale is not None
                                                      else module.compressed.dtype)
            dense = torch.nn.Linear(module.in_features, module.out_features, bias=module.bias is not None,
                                    device=module.compressed.device, dtype=dtype)
            dense.weight.data.copy_(module.dense_weight())
            if module.bias is not None:
                dense.bias.data.copy_(module.bias.data)
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, dense.requires_grad_(False))
            count += 1
    return count


def resident_weight_bytes(model) -> int:
    """Bytes the model's weights occupy in memory: parameters and buffers, tied tensors once, packed ones as stored."""
    seen, total = set(), 0
    for tensor in [*model.parameters(), *model.buffers()]:
        if tensor.is_meta or tensor.data_ptr() in seen:
            continue
        seen.add(tensor.data_ptr())
        total += tensor.numel() * tensor.element_size()
    return total
