"""The served-sparse format through transformers' own door: `import absorbdeploy`, then `from_pretrained(DIR)`.

A `bitmask/` export's config.json names a model type of ours, `absorbdeploy_<base>` (absorbdeploy_llama, ...), and a
quantization_config with quant_method `absorbdeploy-bitmask`. Plain transformers refuses the model type ("does not
recognize this architecture") instead of loading random weights, which is what it does with an unknown quant_method
alone. `register()` (run by `import absorbdeploy` once transformers is imported) makes transformers read it:
- the model type as a subclass of the base config and the base *ForCausalLM (transformers' AutoConfig.register,
  AutoModelForCausalLM.register);
- the quantization config and an HfQuantizer (transformers.quantizers.auto.register_quantization_config /
  register_quantizer) that, before the weights load, swaps every target nn.Linear for a BitmaskLinear sized from the
  safetensors headers, so `<m>.compressed`, `<m>.bitmask`, `<m>.row_offsets`, `<m>.shape` load straight into it and
  no dense weight is ever allocated.
On CUDA the kernel does not run: after loading, the quantizer densifies (one warning line says so).
"""

import logging

from absorbdeploy.sparse.codec import SERVED_SPARSE_METHOD, FormatConfig, model_type_for

log = logging.getLogger("absorbdeploy")
_registered = False


def _model_classes() -> dict:
    """{base: (config class, model class)}: `absorbdeploy_<base>` as subclasses of the base architecture's, defined as
    attributes of this module so that pickling them (vLLM sends its config to its engine processes) finds them."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    from absorbdeploy.source import BLOCK_PATHS

    classes = {}
    for base in BLOCK_PATHS:
        base_config = CONFIG_MAPPING[base]
        base_model = MODEL_FOR_CAUSAL_LM_MAPPING[base_config]
        config = type(f"Absorbdeploy{base_config.__name__}", (base_config,),
                      {"model_type": model_type_for(base), "__module__": __name__})
        model = type(f"Absorbdeploy{base_model.__name__}", (base_model,), {"config_class": config, "__module__": __name__})
        globals()[config.__name__], globals()[model.__name__] = config, model
        classes[base] = (config, model)
    return classes


MODEL_CLASSES = _model_classes()


def register() -> None:
    """Teach transformers our model types, quantization config and quantizer (idempotent)."""
    global _registered
    if _registered:
        return
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.quantizers.auto import register_quantization_config, register_quantizer

    for base, (config, model) in MODEL_CLASSES.items():
        AutoConfig.register(model_type_for(base), config, exist_ok=True)
        AutoModelForCausalLM.register(config, model, exist_ok=True)
    register_quantization_config(SERVED_SPARSE_METHOD)(_config_class())
    register_quantizer(SERVED_SPARSE_METHOD)(_quantizer_class())
    _registered = True


def _config_class():
    from transformers.utils.quantization_config import QuantizationConfigMixin

    class BitmaskConfig(QuantizationConfigMixin):
        """quantization_config of a `bitmask/` export as transformers holds it: codec.FormatConfig's fields."""

        def __init__(self, **kwargs):
            self.description = FormatConfig.from_dict(kwargs)
            self.quant_method = SERVED_SPARSE_METHOD
            self.format, self.values_dtype = self.description.format, self.description.values_dtype
            self.targets, self.version = list(self.description.targets), self.description.version

        def to_dict(self) -> dict:
            return self.description.to_dict()

    return BitmaskConfig


def _quantizer_class():
    from transformers.quantizers.base import HfQuantizer

    class BitmaskQuantizer(HfQuantizer):
        requires_calibration = True  # only pre-packed checkpoints: a dense model is pruned by absorbdeploy, not here

        def validate_environment(self, *args, **kwargs):
            return

        def _process_model_before_weight_loading(self, model, checkpoint_files=None, **kwargs):
            config = self.quantization_config
            swap_linears(model, config.targets, nnz_from_headers(checkpoint_files), config.values_dtype)
            return model

        def _process_model_after_weight_loading(self, model, **kwargs):
            from absorbdeploy.sparse.linear import densify

            if any(b.device.type == "cuda" for b in model.buffers()):
                count = densify(model)
                log.warning("absorbdeploy: the bitmask kernel runs on CPU only; densified %d Linears for CUDA", count)
            return model

        def is_serializable(self, safe_serialization=None):
            return True

        @property
        def is_trainable(self) -> bool:
            return False

    return BitmaskQuantizer


def nnz_from_headers(checkpoint_files) -> dict[str, int]:
    """{module name: non-zeros} from the shards' safetensors headers (no tensor is read)."""
    from pathlib import Path

    from absorbdeploy.checkpoint import read_header

    nnz = {}
    for file in checkpoint_files or []:
        for key, info in read_header(Path(file)).items():
            if key.endswith(".compressed"):
                nnz[key[: -len(".compressed")]] = int(info["shape"][0])
    return nnz


def swap_linears(model, targets, nnz: dict[str, int], values_dtype: str) -> None:
    """Replace each target nn.Linear (state-dict module names) by an empty BitmaskLinear of its checkpoint's size."""
    import torch

    from absorbdeploy.errors import UserError
    from absorbdeploy.sparse.linear import BitmaskLinear

    for name in targets:
        if name not in nnz:
            raise UserError(f"the checkpoint has no packed weights for {name}, which its quantization_config targets")
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        old = getattr(parent, child)
        if not isinstance(old, torch.nn.Linear):
            raise UserError(f"quantization_config targets {name}, which is a {type(old).__name__}, not a Linear")
        device = old.weight.device
        setattr(parent, child, BitmaskLinear(old.in_features, old.out_features, nnz[name], old.bias is not None,
                                             getattr(torch, values_dtype), device))
