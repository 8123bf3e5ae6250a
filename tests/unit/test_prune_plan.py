"""The prune plan: each decision a recipe implies, for every pruner x statistics mode x absorption setting."""

import itertools

import pytest

from absorbdeploy.prune import PRUNERS, Statistic
from absorbdeploy.prune_plan import PrunePlan, PruneSpec
from absorbdeploy.recipe import Recipe, override, settle


def recipe(*sets):
    r = Recipe()
    for assignment in sets:
        r = override(r, assignment)
    return settle(r)[0]


@pytest.mark.parametrize("method, update, statistics, absorption, allocation",
                         list(itertools.product(("magnitude", "wanda", "sparsegpt"), ("none", "admm"), ("sequential", "dense"),
                                                (True, False), ("uniform", "owl"))))
def test_dense_pass_hessian_and_driver_follow_from_what_each_stage_reads(method, update, statistics, absorption, allocation):
    p = PrunePlan.of(recipe(f"prune.method={method}", f"prune.update={update}", f"calibration.statistics={statistics}",
                            f"absorption.enabled={str(absorption).lower()}", f"allocation.method={allocation}"))
    # the update's Hessian outranks what the pruner reads
    reads = "hessian" if update == "admm" else {"magnitude": None, "wanda": "norms", "sparsegpt": "hessian"}[method]
    assert p.spec.statistic == (reads or "nothing")
    # magnitude reads nothing, so it never needs a calibration pass of its own: it prunes from the dense pass (or none)
    assert p.from_dense_pass == (reads is None or statistics == "dense")
    # the dense pass runs for OWL's input norms, for the probe, or for a pruner that takes its statistics from it
    assert p.needs_dense_pass == (allocation == "owl" or absorption or (reads is not None and statistics == "dense"))
    # Hessians cost in^2 per input: accumulated in the dense pass only when someone prunes with them from it
    assert p.dense_pass_hessian == (reads == "hessian" and (statistics == "dense" or absorption))
    assert p.sequential_hessian == (reads == "hessian")
    assert p.probe_states == ((4, 512) if absorption else None)


def test_auto_correction_resolves_through_the_allocator_and_an_explicit_mode_wins():
    assert PrunePlan.of(recipe("allocation.method=owl")).correction == "additive"
    assert PrunePlan.of(recipe("allocation.method=alpha")).correction == "multiplicative"
    assert PrunePlan.of(recipe("allocation.method=alpha", "absorption.mode=additive")).correction == "additive"


def test_analyze_probes_even_when_the_recipe_disables_absorption():
    r = recipe("absorption.enabled=false", "prune.method=sparsegpt")
    assert PrunePlan.of(r).probe_states is None and not PrunePlan.of(r).dense_pass_hessian
    probed = PrunePlan.of(r, probe_all=True)
    assert probed.absorption and probed.probe_states == (4, 512) and probed.dense_pass_hessian


def test_the_plan_carries_the_typed_options_and_the_budget_range():
    p = PrunePlan.of(recipe("prune.method=sparsegpt", "prune.sparsity=0.7", "allocation.method=owl",
                            "allocation.owl.lam=0.12"))
    assert p.spec.options.blocksize == 128 and p.allocation_options.lam == 0.12
    assert (p.sparsity, p.allocation, p.low, p.high) == (0.7, "owl", 0.05, 0.95)
    nm = PruneSpec.of(recipe("prune.method=wanda", "prune.structure=2:4").prune)
    assert (nm.nm.n, nm.nm.m) == (2, 4) and nm.options is None


def test_every_pruner_declares_a_statistic():
    assert all(isinstance(p.needs, Statistic) for p in PRUNERS.values())
