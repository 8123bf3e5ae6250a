"""The recipe's value and cross-field rules: following defaults settle from the settings and model facts they depend
on (saying so), explicit values never change and contradictions are refused, N:M parsing, and `check`'s one-line
refusals, whose choices come from the method tables."""

import dataclasses

import pytest

from absorbdeploy import recipe as rc
from absorbdeploy import recipe_rules
from absorbdeploy.absorb import DEFINITIONS
from absorbdeploy.allocate import ALLOCATORS
from absorbdeploy.errors import UserError
from absorbdeploy.prune import PRUNERS
from absorbdeploy.update import UPDATES
from absorbdeploy.recipe_rules import NM


def _set(*assignments):
    r = rc.Recipe()
    for a in assignments:
        r = rc.override(r, a)
    return r


def test_following_defaults_settle_to_their_plain_values():
    r, notes = rc.settle(rc.Recipe())
    assert notes == []
    assert (r.prune.sparsity, r.absorption.enabled, r.allocation.min, r.allocation.max) == (0.5, False, 0.05, 0.95)
    assert (r.calibration.seqlen, r.validate.seqlen, r.absorption.probe_samples, r.absorption.probe_seqlen) == (512, 512, 4, 512)
    assert r.export.dtype == "bfloat16" and rc.settle(r) == (r, [])


@pytest.mark.parametrize("assignments, facts, expected, note", [
    (["prune.structure=2:4"], {}, {"absorption.enabled": False, "prune.sparsity": 0.5}, None),
    (["prune.structure=1:4"], {}, {"prune.sparsity": 0.25, "absorption.enabled": False}, "prune.sparsity = 0.25"),
    (["prune.sparsity=0.97"], {}, {"allocation.max": 0.97, "allocation.min": 0.05}, "allocation.max = 0.97"),
    (["prune.sparsity=0.02"], {}, {"allocation.min": 0.02}, "allocation.min = 0.02"),
    (["calibration.nsamples=2"], {}, {"absorption.probe_samples": 2}, "absorption.probe_samples = 2"),
    (["calibration.seqlen=128"], {}, {"absorption.probe_seqlen": 128}, None),
    ([], {"context": 256}, {"calibration.seqlen": 256, "validate.seqlen": 256, "absorption.probe_seqlen": 256},
     "the model's context (256 tokens)"),
    ([], {"dtype": "float16"}, {"export.dtype": "float16"}, None),
    ([], {"dtype": "float32"}, {"export.dtype": "bfloat16"}, None),
    (["export.dtype=float32"], {"dtype": "float16"}, {"export.dtype": "float32"}, None),
])
def test_a_default_follows_the_setting_it_depends_on(assignments, facts, expected, note):
    r = rc.Recipe()
    for a in assignments:
        r = rc.override(r, a)
    settled, notes = rc.settle(r, rc.ModelFacts(**facts))
    rc.check(settled)
    for key, value in expected.items():
        node = settled
        for part in key.split("."):
            node = getattr(node, part)
        assert node == value, key
    assert (note is None and not notes) or any(note in n for n in notes), notes


def test_an_explicit_value_never_follows_it_is_refused_when_contradictory():
    r = rc.override(rc.override(rc.Recipe(), "prune.structure=2:4"), "absorption.enabled=true")
    with pytest.raises(UserError, match="needs allocation.method: uniform and absorption.enabled: false"):
        rc.check(r)
    r = rc.override(rc.override(rc.Recipe(), "prune.sparsity=0.97"), "allocation.max=0.9")
    with pytest.raises(UserError, match="outside"):
        rc.check(r)


def test_settling_a_settled_recipe_changes_nothing_and_says_nothing():
    first, notes = recipe_rules.settle(_set("prune.structure=2:4", "calibration.nsamples=2"), rc.ModelFacts(context=256))
    assert [n.split(" = ")[0] for n in notes] == ["calibration.seqlen", "validate.seqlen",
                                                  "absorption.probe_samples"]  # prune.sparsity follows to its plain 0.5
    assert first.calibration.seqlen == 256 and first.absorption.probe_samples == 2 and first.absorption.enabled is False
    assert recipe_rules.settle(first, rc.ModelFacts(context=256)) == (first, [])


@pytest.mark.parametrize("text, expected", [
    (None, None), ("unstructured", None), ("2:4", NM(2, 4)), ("1:8", NM(1, 8)), (NM(4, 8), NM(4, 8)),
])
def test_parse_nm_reads_the_structure(text, expected):
    assert recipe_rules.parse_nm(text) == expected
    assert recipe_rules.structure_name(expected) == (text if isinstance(text, str) else str(text) if text else "unstructured")


@pytest.mark.parametrize("text, fragment", [
    ("4:4", "need 0 < N < M"), ("0:4", "need 0 < N < M"), ("2-4", "got '2-4'"), (24, "got 24"), ("2:4:8", "'N:M'"),
])
def test_parse_nm_refuses_what_is_not_n_of_m(text, fragment):
    with pytest.raises(UserError, match=fragment):
        recipe_rules.parse_nm(text)


@pytest.mark.parametrize("assignments, fragment", [
    (["device=tpu"], "device must be one of auto, cpu, cuda; got 'tpu'"),
    (["calibration.statistics=both"], "calibration.statistics must be one of sequential, dense"),
    (["calibration.nsamples=0"], "calibration.nsamples must be >= 1, got 0"),
    (["calibration.draw=-1"], "calibration.draw must be >= 0, got -1"),
    (["prune.method=obs"], "prune.method must be one of magnitude, wanda, sparsegpt; got 'obs'"),
    (["prune.sparsegpt.dampening=0"], "prune.sparsegpt.dampening must be > 0"),
    (["prune.sparsegpt.blocksize=0"], "prune.sparsegpt.blocksize must be >= 1"),
    (["prune.update=lsq"], "prune.update must be one of none, sparsegpt, admm; got 'lsq'"),
    (["prune.admm.iterations=0"], "prune.admm.iterations must be >= 1"),
    (["prune.admm.growth=0.5"], "prune.admm needs rho > 0, growth >= 1 and dampening > 0"),
    (["allocation.method=best"], "allocation.method must be one of"),
    (["allocation.alpha.eps=1"], "allocation.alpha.eps must be in [0, 1)"),
    (["allocation.atp.beta=-0.1"], "allocation.atp.beta must be >= 0 or null"),
    (["allocation.owl.m=0"], "allocation.owl needs m > 0"),
    (["absorption.definition=mine"], "absorption.definition must be one of gain, composed, margin, paper"),
    (["absorption.mode=both"], "absorption.mode must be one of auto, additive, multiplicative"),
    (["absorption.eps_small=0"], "absorption.eps and absorption.eps_small must be > 0"),
    (["absorption.enabled=true", "absorption.probe_samples=40"], "absorption.probe_samples must be in [1, calibration.nsamples = 32], got 40"),
    (["absorption.enabled=true", "calibration.seqlen=64", "absorption.probe_seqlen=65"], "absorption.probe_seqlen must be in (1, calibration.seqlen = 64], got 65"),
    (["export.formats=[vllm, vllm]"], "export.formats lists a format twice"),
    (["export.dtype=int8"], "export.dtype must be one of auto, float32, bfloat16, float16"),
    (["export.max_shard_size=5TB"], "export.max_shard_size must look like '5GB'"),
    (["export.values=int4"], "export.values must be one of auto, bf16, fp16, int8"),
    (["export.activations=int4"], "export.activations must be one of float, int8"),
    (["export.activations=int8"], "export.activations: int8 (W8A8) needs export.values: int8, got 'auto'"),
    (["validate.gates.max_quantization_ppl_ratio=0"], "validate.gates.max_quantization_ppl_ratio must be > 0 or null"),
    (["validate.gates.w8a8_ppl_tolerance=0"], "validate.gates.w8a8_ppl_tolerance must be > 0 or null"),
    (["export.onnx.opset=17"], "export.onnx.opset must be in [18, 23], got 17"),
    (["export.onnx.dtype=bfloat16"], "export.onnx.dtype must be one of float32, float16"),
    (["validate.eval_windows=0"], "validate.eval_windows must be >= 1"),
    (["validate.latency.iters=0"], "validate.latency.iters must be >= 1"),
    (["validate.gates.max_ppl_ratio=0"], "validate.gates.max_ppl_ratio must be > 0 or null"),
    (["validate.gates.min_top1_agreement=1.5"], "validate.gates.min_top1_agreement must be in [0, 1] or null"),
    (["streaming.mode=maybe"], "streaming.mode must be one of auto, on, off"),
    (["streaming.memory_budget_gb=0"], "streaming.memory_budget_gb must be > 0 or null"),
])
def test_check_refuses_each_bad_value_in_one_line_naming_the_key(assignments, fragment):
    recipe = _set(*assignments)
    with pytest.raises(UserError) as refused:
        recipe_rules.check(recipe)
    assert fragment in str(refused.value) and "\n" not in str(refused.value), str(refused.value)


@pytest.mark.parametrize("key, names", [("prune.method", PRUNERS), ("prune.update", UPDATES), ("allocation.method", ALLOCATORS),
                                        ("absorption.definition", DEFINITIONS)])
def test_every_table_entry_is_an_accepted_choice(key, names):
    for name in names:
        recipe_rules.check(rc.override(rc.Recipe(), f"{key}={name}"))


def test_the_probe_is_checked_only_when_it_runs():
    """Absorption off: its probe settings are not checked, unless a command probes anyway (analyze: check_probe)."""
    r = _set("absorption.enabled=false", "absorption.probe_samples=40")
    recipe_rules.check(r)
    with pytest.raises(UserError, match="absorption.probe_samples must be in"):
        recipe_rules.check_probe(recipe_rules.settle(r)[0])


def test_check_settled_checks_what_settle_filled_in():
    """preflight settles against the model first: a context shorter than an explicit probe length is then refused."""
    r = _set("absorption.enabled=true", "absorption.probe_seqlen=512")
    recipe_rules.check(r)
    settled, _ = recipe_rules.settle(r, rc.ModelFacts(context=256))
    assert settled.calibration.seqlen == 256
    with pytest.raises(UserError, match="absorption.probe_seqlen must be in"):
        recipe_rules.check_settled(settled)
    recipe_rules.check_settled(dataclasses.replace(settled, absorption=dataclasses.replace(settled.absorption, probe_seqlen=256)))
