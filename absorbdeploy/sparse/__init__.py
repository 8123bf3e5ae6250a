"""The served-sparse runtime: everything that reads or runs the `bitmask/` format, bottom to top.

- `codec.py`: the format's constants (part names, layouts, values dtypes, quant_method, model type prefix), the
  `FormatConfig` both doors read, bit packing and unpacking, shard slicing. Pure; imports nothing of ours.
- `integrity.py`: the rules a packed checkpoint must satisfy before any of its bytes is used (every door runs them).
- `kernels/`: `torch.ops.absorbdeploy.bitmask_linear` (C++, one ISA table, a pure-torch reference) and its build.
- `linear.py`: `BitmaskLinear`, an nn.Module holding the packed parts and calling the op.
- `hf.py`: the transformers door (model types, quantization config, quantizer).
- `vllm.py`: the vLLM door (quantization method, tensor-parallel shards, fused layers) and the plugin's `register`.
- `directory.py`: a whole `bitmask/` directory checked before it is handed to vLLM's engine (serve, validation).

A new values dtype is an entry in codec.VALUES_DTYPES and kernels/isa.h's ValueType plus its arithmetic; a new ISA path
is one `kernels/isa_<name>.cpp` plus its row in the ISA table; a new runtime door is one file here. Nothing in this
folder imports a module of absorbdeploy outside it except `errors` and `source` (the supported architectures).
"""
