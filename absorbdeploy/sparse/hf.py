"""The served-sparse format through transformers' own door: `import absorbdeploy`, then `from_pretrained(DIR)`.

A `bitmask/` export keeps every standard loader out, so none of them can build the model with random weights:
- config.json names a model type of ours, `absorbdeploy_<base>` (absorbdeploy_llama, ...): AutoConfig, AutoModel*,
  `pipeline` and vLLM without our plugin refuse it ("does not recognize this architecture");
- the weights are `bitmask*.safetensors` named by `bitmask.safetensors.index.json` (codec.WEIGHTS_INDEX), never
  `model.safetensors`: a base class called directly (`LlamaForCausalLM.from_pretrained(DIR)`), which ignores the model
  type and an unknown quant_method, finds no weights file and raises.
`register()` (run by `import absorbdeploy` once transformers is imported) makes transformers read it:
- the model type as a subclass of the base config, which points transformers at the index (its `transformers_weights`
  attribute), and of the base *ForCausalLM (AutoConfig.register, AutoModelForCausalLM.register);
- the quantization config and an HfQuantizer (register_quantization_config / register_quantizer) that, before the
  weights load, checks the shards' headers against the config (sparse/integrity.py) and swaps every target nn.Linear
  for an empty BitmaskLinear of its size, so `<m>.compressed`, `<m>.bitmask`, `<m>.row_offsets`, `<m>.shape` load
  straight into it and no dense weight is ever allocated; after loading it checks every packed matrix's bits and
  offsets. A damaged checkpoint raises codec.PackedFormatError naming the module.
Every class is defined at module level, so models, configs and quantizers pickle and deep-copy.
On CUDA the kernel does not run: after loading, the quantizer densifies (one warning line says so).
"""

import logging
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING
from transformers.quantizers.auto import register_quantization_config, register_quantizer
from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from absorbdeploy.checkpoint import read_header
from absorbdeploy.sparse import integrity
from absorbdeploy.sparse.codec import (
    SERVED_SPARSE_METHOD, WEIGHTS_INDEX, FormatConfig, PackedFormatError, model_type_for, names_weights_index,
)
from absorbdeploy.sparse.linear import BitmaskLinear, densify

log = logging.getLogger("absorbdeploy")
_registered = False


def _config_methods(base_config) -> dict:
    """__post_init__ points transformers at the weights index (`transformers_weights`, transformers' own attribute,
    read by from_pretrained); to_dict leaves it out, so no config.json written from this config can point a plain
    base class at the packed weights."""

    def __post_init__(self, **kwargs):
        base_config.__post_init__(self, **kwargs)
        if names_weights_index(getattr(self, "quantization_config", None)):
            self.transformers_weights = WEIGHTS_INDEX

    def to_dict(self) -> dict:
        config = base_config.to_dict(self)
        config.pop("transformers_weights", None)
        return config

    return {"__post_init__": __post_init__, "to_dict": to_dict}


def _model_classes() -> dict:
    """{base: (config class, model class)}: `absorbdeploy_<base>` as subclasses of the base architecture's, defined as
    attributes of this module so that pickling them (vLLM sends its config to its engine processes) finds them."""
    from absorbdeploy.source import BLOCK_PATHS

    classes = {}
    for base in BLOCK_PATHS:
        base_config = CONFIG_MAPPING[base]
        base_model = MODEL_FOR_CAUSAL_LM_MAPPING[base_config]
        config = type(f"Absorbdeploy{base_config.__name__}", (base_config,),
                      {"model_type": model_type_for(base), "__module__": __name__, **_config_methods(base_config)})
        model = type(f"Absorbdeploy{base_model.__name__}", (base_model,), {"config_class": config, "__module__": __name__})
        globals()[config.__name__], globals()[model.__name__] = config, model
        classes[base] = (config, model)
    return classes


MODEL_CLASSES = _model_classes()


class BitmaskConfig(QuantizationConfigMixin):
    """quantization_config of a `bitmask/` export as transformers holds it: codec.FormatConfig's fields. Raises
    PackedFormatError for a layout, values dtype, version or targets it does not accept."""

    def __init__(self, **kwargs):
        self.description = FormatConfig.from_dict(kwargs)
        self.quant_method = SERVED_SPARSE_METHOD
        self.format, self.values_dtype = self.description.format, self.description.values_dtype
        self.targets, self.version = list(self.description.targets), self.description.version

    def to_dict(self) -> dict:
        return self.description.to_dict()


class BitmaskQuantizer(HfQuantizer):
    """Builds BitmaskLinear modules for the config's targets and proves the checkpoint consistent around loading."""

    requires_calibration = True  # only pre-packed checkpoints: a dense model is pruned by absorbdeploy, not here

    def validate_environment(self, *args, **kwargs):
        return

    def _process_model_before_weight_loading(self, model, checkpoint_files=None, **kwargs):
        config = self.quantization_config
        headers = {}
        for file in checkpoint_files or []:
            headers.update({k: v for k, v in read_header(Path(file)).items() if k != "__metadata__"})
        integrity.check_targets(config.targets, headers, config.values_dtype)
        for name in config.targets:
            old = target_linear(model, name)
            integrity.check_layout(name, integrity.describe_header(headers, name), config.values_dtype,
                                   old.out_features, old.in_features)
            nnz = int(headers[f"{name}.compressed"]["shape"][0])
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child,
                    BitmaskLinear(old.in_features, old.out_features, nnz, old.bias is not None,
                                  getattr(torch, config.values_dtype), old.weight.device,
                                  quantize_x=config.description.quantize_x))
        return model

    def _process_model_after_weight_loading(self, model, **kwargs):
        config = self.quantization_config
        for name in config.targets:
            module = model.get_submodule(name)
            integrity.check_packed(name, {part: getattr(module, part) for part in config.description.parts},
                                   config.values_dtype,
                                   module.out_features, module.in_features)
        if any(b.device.type == "cuda" for b in model.buffers()):
            count = densify(model)
            log.warning("absorbdeploy: the bitmask kernel runs on CPU only; densified %d Linears for CUDA%s", count,
                        " (their inputs are no longer quantized: W8A16)" if config.description.quantize_x else "")
        return model

    def is_serializable(self, safe_serialization=None):
        return True

    @property
    def is_trainable(self) -> bool:
        return False


def target_linear(model, name: str):
    """The nn.Linear a target names; PackedFormatError when the model has no such Linear."""
    try:
        module = model.get_submodule(name)
    except AttributeError:
        raise PackedFormatError(f"{name}: quantization_config.targets names it, but the model has no such module") from None
    if not isinstance(module, torch.nn.Linear):
        raise PackedFormatError(f"{name}: quantization_config.targets names a {type(module).__name__}, not a Linear")
    return module


def register() -> None:
    """Teach transformers our model types, quantization config and quantizer (idempotent; importing this module
    runs it)."""
    global _registered
    if _registered:
        return
    for base, (config, model) in MODEL_CLASSES.items():
        AutoConfig.register(model_type_for(base), config, exist_ok=True)
        AutoModelForCausalLM.register(config, model, exist_ok=True)
    register_quantization_config(SERVED_SPARSE_METHOD)(BitmaskConfig)
    register_quantizer(SERVED_SPARSE_METHOD)(BitmaskQuantizer)
    _registered = True


register()
