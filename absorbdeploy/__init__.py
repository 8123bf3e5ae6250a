"""absorbdeploy: absorption-aware layer-wise pruning, exported and verified in each runtime."""

__version__ = "0.1.0"
