"""The load stage's checks on weights: non-finite values, values past the export dtype, rounding facts, tying."""

import pytest
import torch

from absorbdeploy import load
from absorbdeploy.errors import UserError


def test_non_finite_and_unrepresentable_weights_are_refused():
    load.check_weights([("a", torch.ones(3)), ("ids", torch.arange(3))], "float16")
    with pytest.raises(UserError, match="b holds 1 NaN and 1 infinite"):
        load.check_weights([("b", torch.tensor([1.0, float("nan"), float("-inf")]))], "bfloat16")
    with pytest.raises(UserError, match="beyond float16's range"):
        load.check_weights([("c", torch.tensor([7e4]))], "float16")
    load.check_weights([("c", torch.tensor([7e4]))], "bfloat16")


def test_rounding_reports_what_changed():
    model = torch.nn.Linear(4, 2, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1.0, 0.5, 1 + 2**-10, 3.0], [0.25, 1 + 2**-9, 2.0, 4.0]]))
    facts = load.round_weights(model, "bfloat16")
    assert facts["changed"] == 2 and facts["weights"] == 8 and facts["max_abs_change"] == pytest.approx(2**-9)
    assert load.round_weights(model, "bfloat16")["changed"] == 0
    assert load.round_weights(model, "float32") == {"changed": 0, "weights": 0, "max_abs_change": 0.0}


def test_tied_aliases_follow_the_config_not_the_class():
    from absorbdeploy.tiny import build_tiny_llama

    tied, _ = build_tiny_llama()
    untied, _ = build_tiny_llama(tie_word_embeddings=False)
    assert load.tied_aliases(tied) == {"lm_head.weight": "model.embed_tokens.weight"}
    assert load.tied_aliases(untied) == {}


def test_a_cuda_request_without_a_gpu_is_refused(monkeypatch):
    monkeypatch.setattr(load.os.path, "exists", lambda p: False)
    with pytest.raises(UserError, match="no NVIDIA GPU"):
        load.check_device_present("cuda")
    load.check_device_present("auto")
