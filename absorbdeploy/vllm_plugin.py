"""absorbdeploy's vLLM plugin (entry point `vllm.general_plugins`, loaded by vLLM in each of its processes): teaches
vLLM the served-sparse `bitmask` format, so `vllm serve DIR/bitmask` and `LLM(model=DIR/bitmask)` run our CPU kernel.

It registers the model types `absorbdeploy_<base>` with transformers (vLLM reads config.json through AutoConfig) and
the quantization method `absorbdeploy-bitmask` with vLLM (vllm_bitmask.BitmaskConfig). Nothing else in vLLM changes.
"""


def register() -> None:
    from vllm.model_executor.layers.quantization import QUANTIZATION_METHODS, register_quantization_config

    from absorbdeploy.checkpoint import SERVED_SPARSE_METHOD
    from absorbdeploy.hf_bitmask import register as register_with_transformers
    from absorbdeploy.vllm_bitmask import BitmaskConfig

    register_with_transformers()
    if SERVED_SPARSE_METHOD not in QUANTIZATION_METHODS:
        register_quantization_config(SERVED_SPARSE_METHOD)(BitmaskConfig)
