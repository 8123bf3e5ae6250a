"""Compute kernels for pruned weights: `bitmask_linear` (x @ W^T with W in the compressed-safetensors bitmask layout).

Importing this package compiles nothing: the C++ kernels are built (or taken from the cache) on the first
`ensure_loaded()`, which `bitmask_linear` calls; `python -m absorbdeploy.sparse.kernels build` builds them ahead of time.
"""

from absorbdeploy.sparse.kernels.ops import (
    ISA_VARIABLE,
    active_path,
    available_paths,
    bitmask_linear,
    bitmask_linear_reference,
    ensure_loaded,
)
from absorbdeploy.sparse.kernels.tune import PATH_VARIABLE, ensure_planned, served_path

__all__ = ["ISA_VARIABLE", "PATH_VARIABLE", "active_path", "available_paths", "bitmask_linear",
           "bitmask_linear_reference", "ensure_loaded", "ensure_planned", "served_path"]
