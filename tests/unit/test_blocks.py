"""The prunable set of the tiny model and the N:M shape check."""

import pytest

from absorbdeploy import blocks
from absorbdeploy.errors import UserError


def test_prunable_set_is_every_decoder_linear():
    from absorbdeploy.tiny import build_tiny_llama

    model, _ = build_tiny_llama()
    layers = blocks.decoder_blocks(model)
    names = blocks.prunable_names(model, layers)
    assert len(layers) == 4 and len(names) == 28 and "lm_head.weight" not in names
    assert names[0] == "model.layers.0.self_attn.q_proj.weight"
    assert blocks.matrix_sizes(layers)[0] == [128 * 128, 64 * 128, 64 * 128, 128 * 128, 256 * 128, 256 * 128, 128 * 256]
    blocks.check_nm(layers, (2, 4))
    with pytest.raises(UserError, match="divisible by 6; block 0 self_attn.q_proj has 128 inputs"):
        blocks.check_nm(layers, (3, 6))
