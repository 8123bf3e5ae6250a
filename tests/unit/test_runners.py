"""Perplexity and next-token log-probs, by hand."""

import math

import torch

from absorbdeploy.runners import perplexity, target_logprobs


def test_target_logprobs_gather_the_next_token():
    logits = torch.zeros(1, 3, 4)
    logits[0, 0, 2] = math.log(3.0)  # p(next = 2) = 3/6 at position 0
    ids = torch.tensor([[0, 2, 1]])
    lp = target_logprobs(logits, ids)
    assert lp.shape == (1, 2)
    assert math.isclose(float(lp[0, 0]), math.log(0.5), rel_tol=1e-6)
    assert math.isclose(float(lp[0, 1]), math.log(0.25), rel_tol=1e-6)


def test_perplexity_is_exp_of_the_mean_nll_over_predicted_tokens():
    lp = torch.log(torch.tensor([[0.5, 0.25], [0.5, 0.5]]))
    assert math.isclose(perplexity(lp), math.exp(-(math.log(0.5) * 3 + math.log(0.25)) / 4), rel_tol=1e-6)  # fp32 inputs
