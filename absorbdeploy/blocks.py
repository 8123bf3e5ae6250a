"""The model's structure as the pipeline sees it: decoder blocks, the prunable set, and its per-matrix sizes.

Prunable set (design §2): every nn.Linear inside the decoder blocks; embeddings, norms and lm_head never. Which module
holds the blocks comes from an allow-list keyed by `model_type` (source.BLOCK_PATHS).
"""

from absorbdeploy.errors import UserError
from absorbdeploy.source import BLOCK_PATHS


def decoder_blocks(model, trust_remote_code: bool = False) -> list:
    """The decoder blocks in order; UserError when there are none or one holds no Linear."""
    path = BLOCK_PATHS.get(getattr(model.config, "model_type", None))
    if path is None and trust_remote_code:
        path = "model.layers"
    node = model
    for attr in (path or "").split("."):
        node = getattr(node, attr, None) if attr else None
    blocks = list(node) if node is not None else []
    if not blocks or not all(prunable_linears(b) for b in blocks):
        raise UserError(f"no decoder blocks with Linear layers found at {path!r} in {type(model).__name__}")
    return blocks


def prunable_linears(block) -> list[tuple[str, object]]:
    """Every nn.Linear inside a decoder block, in module order: (name within the block, module)."""
    import torch

    return [(name, m) for name, m in block.named_modules() if isinstance(m, torch.nn.Linear)]


def matrix_sizes(blocks) -> list[list[int]]:
    """Weights per prunable matrix, per block (works on meta-device blocks too)."""
    return [[m.weight.numel() for _, m in prunable_linears(b)] for b in blocks]


def prunable_names(model, blocks) -> tuple[str, ...]:
    """State-dict names of every prunable weight: the set whose sparsity the budget and the audits count."""
    names = {id(m): n for n, m in model.named_modules()}
    return tuple(f"{names[id(m)]}.weight" for b in blocks for _, m in prunable_linears(b))


def check_nm(blocks, nm: tuple[int, int]) -> None:
    """N:M groups run along the input dimension: every prunable Linear's input size must be a multiple of M."""
    for index, block in enumerate(blocks):
        for name, linear in prunable_linears(block):
            if linear.in_features % nm[1]:
                raise UserError(f"prune.structure {nm[0]}:{nm[1]} needs every Linear's input dimension divisible by "
                                f"{nm[1]}; block {index} {name} has {linear.in_features} inputs")
