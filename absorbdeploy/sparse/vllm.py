"""The served-sparse `bitmask` format inside vLLM: a quantization method whose Linear layers hold only the packed
tensors and run absorbdeploy's CPU kernel. `register` is the plugin (entry point `vllm.general_plugins`, which vLLM
loads in each of its processes): it registers the model types `absorbdeploy_<base>` with transformers (vLLM reads
config.json through AutoConfig) and the quantization method `absorbdeploy-bitmask` with vLLM; nothing else changes.

vLLM fuses q/k/v into qkv_proj and gate/up into gate_up_proj and calls a parameter's `weight_loader` once per
checkpoint shard (shard id "q"/"k"/"v" or 0/1). The packed tensors have a data-dependent size, so each layer starts
with empty placeholders whose loader keeps every shard's tensors; `process_weights_after_loading` cuts them for tensor
parallelism (column-parallel: a range of output rows; row-parallel: a range of input columns, cutting every row's
bitmask and values at the boundary; codec.slice_rows / slice_columns), stacks the shards of a fused layer
(codec.concat_rows) and installs the result. Layers the checkpoint does not pack stay vLLM's own dense Linears.

Integrity (sparse/integrity.py): `maybe_update_config`, which vLLM calls with the model's directory before building the
model, checks the config's targets against the shards' tensor names; each checkpoint matrix is checked (dtypes,
shapes, bits, row offsets) before it is cut or stacked. A damaged checkpoint raises codec.PackedFormatError naming the
module (`absorbdeploy serve` checks the whole directory first and exits 2 with that line).
"""

import torch
from torch.nn import Parameter
from vllm.model_executor.layers.linear import (
    ColumnParallelLinear, LinearBase, LinearMethodBase, MergedColumnParallelLinear, QKVParallelLinear,
    RowParallelLinear, UnquantizedLinearMethod,
)
from vllm.model_executor.layers.quantization.base_config import QuantizationConfig

from absorbdeploy.sparse import integrity
from absorbdeploy.sparse.codec import (
    SCALE_PART, SERVED_SPARSE_METHOD, FormatConfig, PackedFormatError, concat_rows, part_dtype, parts_for, slice_columns, slice_rows,
)


def placeholder_dtypes(values_dtype: str) -> dict:
    """Empty stand-ins' dtypes until the loader hands over each shard's tensors (their dtype is the checkpoint's)."""
    return {part: getattr(torch, part_dtype(part, values_dtype)) for part in parts_for(values_dtype)}


def register() -> None:
    """The vLLM plugin: teach this vLLM process our model types and quantization method (idempotent)."""
    from vllm.model_executor.layers.quantization import QUANTIZATION_METHODS, register_quantization_config

    from absorbdeploy.sparse.hf import register as register_with_transformers

    register_with_transformers()
    if SERVED_SPARSE_METHOD not in QUANTIZATION_METHODS:
        register_quantization_config(SERVED_SPARSE_METHOD)(BitmaskConfig)


class BitmaskLinearMethod(LinearMethodBase):
    """Packed weights for one (possibly fused) Linear; `apply` is torch.ops.absorbdeploy.bitmask_linear. `modules`:
    the checkpoint's module names it stacks, in shard order (q, k, v / gate, up / itself)."""

    def __init__(self, modules: list[str], values_dtype: str, quantize_x: bool = False):
        super().__init__()
        self.modules, self.values_dtype, self.quantize_x = modules, values_dtype, quantize_x

    def create_weights(self, layer, input_size_per_partition, output_partition_sizes, input_size, output_size,
                       params_dtype, **extra_weight_attrs):
        from vllm.platforms import current_platform

        if not current_platform.is_cpu():
            raise ValueError(f"{SERVED_SPARSE_METHOD}: absorbdeploy's bitmask kernel runs on CPU only; serve the "
                             "dense vllm/ export of the same run on this device")
        layer.bitmask_in_features = input_size_per_partition
        layer.bitmask_out_features = sum(output_partition_sizes)
        layer.bitmask_pending = {}

        def loader(param, loaded, shard_id=None):
            layer.bitmask_pending.setdefault(shard_id, {})[param.bitmask_part] = loaded.clone()

        for part, dtype in placeholder_dtypes(self.values_dtype).items():
            param = Parameter(torch.empty(0, dtype=dtype), requires_grad=False)
            param.bitmask_part = part
            param.weight_loader = loader
            layer.register_parameter(part, param)

    def process_weights_after_loading(self, layer) -> None:
        from absorbdeploy.sparse.kernels import ensure_loaded, ensure_planned

        ensure_loaded()  # define the op (and its fake) before any torch.compile trace
        shards = []
        for module, shard_id in zip(self.modules, _shard_order(layer)):
            parts = layer.bitmask_pending.pop(shard_id, {})
            integrity.check_packed(module, parts, self.values_dtype, columns=layer.input_size)
            shards.append(_shard(layer, shard_id, parts))
        packed = concat_rows(shards)
        if packed["bitmask"].shape[0] != layer.bitmask_out_features:
            raise PackedFormatError(f"{' + '.join(self.modules)}: {packed['bitmask'].shape[0]} packed rows on this "
                                    f"rank, the model expects {layer.bitmask_out_features}")
        for part in parts_for(self.values_dtype):
            setattr(layer, part, Parameter(packed[part].contiguous(), requires_grad=False))
        del layer.bitmask_pending
        # the kernel's batch crossover for this layer, measured once per machine (kernels/tune.py)
        ensure_planned(layer.compressed, layer.bitmask, layer.row_offsets, layer.bitmask_in_features,
                       torch.int8 if self.quantize_x else getattr(layer, "params_dtype", torch.get_default_dtype()),
                       getattr(layer, SCALE_PART, None))

    def apply(self, layer, x, bias=None):
        # W8A8 under tensor parallelism: a row-parallel rank quantizes its own slice of x per token, as vLLM's dense
        # W8A8 layers do
        return torch.ops.absorbdeploy.bitmask_linear(x, layer.compressed, layer.bitmask, layer.row_offsets,
                                                     layer.bitmask_in_features, bias, getattr(layer, SCALE_PART, None),
                                                     self.quantize_x)


def _shard_order(layer) -> list:
    if isinstance(layer, QKVParallelLinear):
        return ["q", "k", "v"]
    if isinstance(layer, MergedColumnParallelLinear):
        return list(range(len(layer.output_sizes)))
    return [None]


def _shard(layer, shard_id, parts: dict) -> dict:
    """One checkpoint matrix's packed tensors, cut to this rank's part."""
    rows, columns = (int(v) for v in parts["shape"].reshape(-1))
    size, rank = layer.tp_size, layer.tp_rank
    if size == 1:
        return parts
    if isinstance(layer, RowParallelLinear):  # every rank holds all rows, a range of the input
        return slice_columns(parts, rank * columns // size, (rank + 1) * columns // size)
    if isinstance(layer, ColumnParallelLinear):  # every rank holds a range of the output rows
        step = rows // size
        if isinstance(layer, QKVParallelLinear) and shard_id in ("k", "v"):  # KV heads may be replicated
            step = rows // layer.total_num_kv_heads * layer.num_kv_heads
            rank = rank // layer.num_kv_head_replicas
        return slice_rows(parts, rank * step, (rank + 1) * step)
    return parts


class BitmaskConfig(QuantizationConfig):
    """quantization_config of a `bitmask/` export (codec.FormatConfig): `targets` names the packed Linears."""

    def __init__(self, description: FormatConfig):
        super().__init__()
        self.description = description
        self.targets, self.values_dtype = set(description.targets), description.values_dtype

    def get_name(self) -> str:
        return SERVED_SPARSE_METHOD

    def get_supported_act_dtypes(self) -> list:
        return [torch.bfloat16, torch.float16, torch.float32]

    @classmethod
    def get_min_capability(cls) -> int:
        return 0

    @staticmethod
    def get_config_filenames() -> list[str]:
        return []  # the quantization_config in config.json says it all

    @classmethod
    def from_config(cls, config: dict) -> "BitmaskConfig":
        return cls(FormatConfig.from_dict(config))

    def maybe_update_config(self, model_name: str, hf_config=None, revision=None) -> None:
        """vLLM's hook with the model's path, before the model is built: the targets against the shards' tensors."""
        from pathlib import Path

        from absorbdeploy.checkpoint import check_index

        folder = Path(model_name)
        if folder.is_dir():
            names = [k for header in check_index(folder).values() for k in header]
            integrity.check_targets(self.targets, names, self.values_dtype)

    def get_quant_method(self, layer, prefix: str):
        if not isinstance(layer, LinearBase):
            return None
        modules = self._packed(prefix)
        return (BitmaskLinearMethod(modules, self.values_dtype, self.description.quantize_x) if modules
                else UnquantizedLinearMethod())

    def _packed(self, prefix: str) -> list[str]:
        """vLLM's (possibly fused) module name -> the checkpoint modules it stacks when the checkpoint packs them,
        else []; a fused layer is all or nothing."""
        head, _, last = prefix.rpartition(".")
        names = [f"{head}.{part}" if head else part for part in self.packed_modules_mapping.get(last, [last])]
        found = [name in self.targets for name in names]
        if any(found) and not all(found):
            raise PackedFormatError(f"{prefix} fuses {names}, of which quantization_config.targets lists only some")
        return names if all(found) else []
