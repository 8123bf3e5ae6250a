"""Fuzz the recipe loader and the --set parser: whatever the input, the result is a Recipe or a one-line UserError."""

import string

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from absorbdeploy import recipe as rc
from absorbdeploy.errors import UserError

KEYS = ["version", "model", "device", "calibration", "prune", "allocation", "absorption", "export", "validate",
        "calibration.nsamples", "calibration.seqlen", "prune.sparsity", "prune.structure", "prune.method",
        "allocation.min", "allocation.max", "allocation.owl.lam", "absorption.strength", "export.formats",
        "validate.gates.max_ppl_ratio", "validate.eval_windows", "nope", "prune.nope", ""]
scalars = st.one_of(st.none(), st.booleans(), st.integers(-5, 10**6), st.floats(allow_nan=True, allow_infinity=True),
                    st.text(string.printable, max_size=12), st.sampled_from(["2:4", "4:4", "1e-3", "wanda", "owl", "[a, b]"]))
values = st.recursive(scalars, lambda children: st.one_of(st.lists(children, max_size=3),
                                                          st.dictionaries(st.sampled_from(KEYS), children, max_size=4)), max_leaves=10)


def accepted_or_user_error(fn):
    try:
        result = fn()
    except UserError as e:
        assert str(e) and "\n" not in str(e)
        return None
    assert isinstance(result, rc.Recipe)
    rc.check(result)
    return result


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(document=st.one_of(st.text(string.printable, max_size=200), values.map(lambda v: __import__("yaml").safe_dump(v))))
def test_recipe_loader_never_raises_anything_but_user_error(document):
    accepted_or_user_error(lambda: rc.from_yaml_text(document, "fuzz"))


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(key=st.sampled_from(KEYS) | st.text(string.printable, max_size=20), value=st.text(string.printable, max_size=20))
def test_set_parser_never_raises_anything_but_user_error(key, value):
    def apply():
        r = rc.override(rc.Recipe(), f"{key}={value}")
        rc.check(r)
        return r

    accepted_or_user_error(apply)
