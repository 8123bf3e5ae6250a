"""The absorption probe on a real (tiny, trained) model: finite, shaped outputs; the block-major pass equals the
per-injection definition; coefficients do not depend on the order of the probe windows."""

import dataclasses
import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from absorbdeploy import absorb, allocate, calibrate, data, probe
from absorbdeploy.blocks import decoder_blocks, matrix_sizes
from absorbdeploy.prune_plan import PruneSpec
from absorbdeploy.recipe import Recipe, override, settle
from absorbdeploy.tiny import byte_tokenizer


@pytest.fixture(scope="module")
def setup(tiny_trained_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_trained_dir, dtype=torch.float32).eval()
    blocks = decoder_blocks(model)
    r = Recipe()
    for assignment in ("prune.method=wanda", "prune.update=none", "calibration.nsamples=8", "calibration.seqlen=64", "absorption.enabled=true",
                       "absorption.probe_samples=4", "absorption.probe_seqlen=64", "allocation.method=uniform"):
        r = override(r, assignment)
    r = settle(r)[0]
    windows = data.calibration_windows(data.build_corpus(byte_tokenizer(), None, None), 8, 64)
    runner = calibrate.BlockRunner(model, blocks, 4)
    profile = calibrate.dense_profile(runner, windows, False, (4, 64))
    params = [sum(s) for s in matrix_sizes(blocks)]
    base = allocate.base_allocation("uniform", None, params, 0.5, None, r.allocation.min, r.allocation.max)
    return runner, profile, base, params, r


def run_probe(runner, profile, base, r, eps, composed):
    return probe.probe(runner, profile, base, PruneSpec.of(r.prune), r.absorption, eps, composed, r.calibration.seed)


def coefficients(result, definition, r):
    return absorb.summarise(result, definition, r.absorption.eps, r.absorption.eps_small)["coefficients"]


def test_probe_outputs_are_finite_and_shaped(setup):
    runner, profile, base, params, r = setup
    result = run_probe(runner, profile, base, r, [0.01, 1.0], True)
    n = len(params)
    for eps in (0.01, 1.0):
        assert len(result["curves"][eps]) == n
        for l, row in enumerate(result["curves"][eps]):
            assert sorted(row["rel"]) == list(range(l, n))
            assert all(math.isfinite(v) and v >= 0 for v in row["rel"].values())
            assert all(-1.0001 <= v <= 1.0001 for v in row["cos"].values())
    for definition in absorb.DEFINITIONS:
        coeffs = coefficients(result, definition, r)
        assert len(coeffs) == n and all(math.isfinite(c) for c in coeffs) and coeffs[-1] == 0.0
    assert result["block_forwards"] == n * (n - 1) + 2 * n + (n - 1)  # 2 eps trajectories + delta/composed passes


def test_block_major_probe_equals_the_per_injection_definition(setup):
    runner, profile, base, params, r = setup
    result = run_probe(runner, profile, base, r, [1.0], False)
    dense = [lambda h, k=k: runner.run(runner.blocks[k], h) for k in range(len(params))]
    for l in range(len(params)):
        with probe._Pruned(runner.blocks[l], profile.stats[l], base[l], PruneSpec.of(r.prune)) as pruned:
            delta = runner.run(pruned, profile.probe_hidden[l]) - profile.probe_hidden[l + 1]
        expected = absorb.propagate(dense, profile.probe_hidden, delta, l, 1.0, r.absorption.skip_tokens)
        for k, value in expected["rel"].items():
            assert result["curves"][1.0][l]["rel"][k] == pytest.approx(value, rel=1e-6, abs=1e-9)


def test_coefficients_do_not_depend_on_probe_window_order(setup):
    runner, profile, base, params, r = setup
    order = torch.tensor([2, 0, 3, 1])
    shuffled = dataclasses.replace(profile, probe_hidden=[h[order] for h in profile.probe_hidden])
    a = coefficients(run_probe(runner, profile, base, r, [1.0], False), "gain", r)
    b = coefficients(run_probe(runner, shuffled, base, r, [1.0], False), "gain", r)
    assert a == pytest.approx(b, abs=1e-5)


def test_gaussian_control_runs_with_matched_norms(setup):
    runner, profile, base, params, r = setup
    control = dataclasses.replace(r, absorption=dataclasses.replace(r.absorption, perturbation="gaussian"))
    real = run_probe(runner, profile, base, r, [1.0], False)["curves"][1.0]
    noise = run_probe(runner, profile, base, control, [1.0], False)["curves"][1.0]
    for l in range(len(params)):  # same per-token norm at injection, so the same absolute drift there
        assert noise[l]["abs"][l] == pytest.approx(real[l]["abs"][l], rel=1e-4)
        assert noise[l]["rel"] != real[l]["rel"] or l == len(params) - 1


def test_a_horizon_follows_each_error_fewer_blocks_with_the_same_numbers(setup):
    runner, profile, base, params, r = setup
    full = run_probe(runner, profile, base, r, [1.0], False)
    short_settings = dataclasses.replace(r, absorption=dataclasses.replace(r.absorption, horizon=1))
    short = run_probe(runner, profile, base, short_settings, [1.0], False)
    n = len(params)
    for l in range(n):
        assert sorted(short["curves"][1.0][l]["rel"]) == list(range(l, min(l + 1, n - 1) + 1))
        for k, value in short["curves"][1.0][l]["rel"].items():
            assert value == pytest.approx(full["curves"][1.0][l]["rel"][k], rel=1e-6)
    assert short["block_forwards"] == n + (n - 1) < full["block_forwards"]  # one delta per block + one step each


def test_an_injection_stride_measures_fewer_blocks_and_interpolates_the_rest(setup):
    runner, profile, base, params, r = setup
    full = run_probe(runner, profile, base, r, [0.01, 1.0], False)
    strided = dataclasses.replace(r, absorption=dataclasses.replace(r.absorption, injection_stride=2))
    part = run_probe(runner, profile, base, strided, [0.01, 1.0], False)
    n = len(params)
    injected = sorted(set(range(0, n, 2)) | {n - 1})
    for l in range(n):
        row = part["curves"][1.0][l]["rel"]
        if l in injected:  # the same numbers as the full probe where it injects
            assert row == pytest.approx(full["curves"][1.0][l]["rel"], rel=1e-6)
        else:
            assert row == {}
    trajectories = sum(2 * (n - 1 - l) for l in injected)
    assert part["block_forwards"] == len(injected) + trajectories < full["block_forwards"]
    for definition in ("gain", "margin", "paper"):
        a, b = coefficients(full, definition, r), coefficients(part, definition, r)
        for l in range(n):
            if l in injected:
                assert b[l] == pytest.approx(a[l], rel=1e-5, abs=1e-9)
            else:  # between its measured neighbours, linear in depth
                assert b[l] == pytest.approx((b[l - 1] + b[l + 1]) / 2, rel=1e-9, abs=1e-12)
