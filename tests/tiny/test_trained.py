"""Facts that need a model whose perplexity means something: the tiny Llama trained on pydoc text."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from tests.helpers import eval_ppl, prune_in_memory


def fresh(folder):
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def test_trained_fixture_is_far_better_than_chance(tiny_trained_dir):
    assert eval_ppl(fresh(tiny_trained_dir)) < 20  # chance is about 258


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_perplexity_grows_with_sparsity(tiny_trained_dir, method):
    """Measured on this fixture: dense 14.99; magnitude 14.92 / 15.51 / 26.98 and Wanda 14.83 / 15.31 / 23.80 at
    50 / 70 / 90 %; SparseGPT's updates hold it near 15 until 90 % (15.85). Below ~60 % pruning can even help a model this
    small, so the claim is made from 50 % up."""
    dense = eval_ppl(fresh(tiny_trained_dir))
    ppls = []
    for sparsity in (0.5, 0.7, 0.9):
        model = fresh(tiny_trained_dir)
        prune_in_memory(model, sparsity, method)
        ppls.append(eval_ppl(model))
    assert ppls[2] > ppls[0] and ppls[2] > 1.04 * dense, (dense, ppls)
    if method != "sparsegpt":
        assert ppls == sorted(ppls) and ppls[2] > 1.5 * dense, (dense, ppls)


def test_sparsegpt_retries_with_more_damping_when_cholesky_fails(tiny_trained_dir, monkeypatch):
    """The first factorisation of every Hessian is made to fail; every matrix must then record 10x the dampening."""
    real = torch.linalg.cholesky_ex
    state = {"fail_next": True}

    def first_attempt_fails(matrix, *args, upper=False, **kwargs):
        factor, info = real(matrix, *args, upper=upper, **kwargs)
        if upper:  # the last step of a successful factorisation: the next Hessian's first attempt fails again
            state["fail_next"] = True
        elif state["fail_next"]:
            state["fail_next"] = False
            info = torch.ones_like(info)
        return factor, info

    monkeypatch.setattr(torch.linalg, "cholesky_ex", first_attempt_fails)
    model = fresh(tiny_trained_dir)
    records = prune_in_memory(model, 0.5, "sparsegpt")
    assert len(records) == 4 * 7 and all(r.dampening == pytest.approx(0.1) for r in records)
    assert all(r.zeros == r.target_zeros for r in records)
