"""Optional zero-shot accuracy: off when disabled, skipped with the reason when lm-eval is missing or cannot run offline,
and otherwise the per-task accuracy and mean of what lm-eval returns, for the dense and then the pruned model. lm-eval
is replaced by a stand-in module, so these run whether or not it is installed."""

import sys
import types

import pytest

from absorbdeploy import zeroshot
from absorbdeploy.recipe import ZeroShot


@pytest.fixture()
def lm_eval(monkeypatch):
    """A stand-in lm_eval package recording its calls; `answers` is what simple_evaluate returns (or raises) in turn."""
    calls = {"hflm": [], "evaluate": [], "answers": []}

    class HFLM:
        def __init__(self, pretrained, tokenizer, batch_size):
            calls["hflm"].append((pretrained, tokenizer, batch_size))

    def simple_evaluate(model, tasks, num_fewshot, limit):
        calls["evaluate"].append({"model": model, "tasks": tasks, "num_fewshot": num_fewshot, "limit": limit})
        answer = calls["answers"].pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    package = types.ModuleType("lm_eval")
    package.simple_evaluate = simple_evaluate
    huggingface = types.ModuleType("lm_eval.models.huggingface")
    huggingface.HFLM = HFLM
    monkeypatch.setitem(sys.modules, "lm_eval", package)
    monkeypatch.setitem(sys.modules, "lm_eval.models", types.ModuleType("lm_eval.models"))
    monkeypatch.setitem(sys.modules, "lm_eval.models.huggingface", huggingface)
    return calls


SETTINGS = ZeroShot(enabled=True, tasks=("boolq", "rte", "wsc"), limit=20)


def test_disabled_runs_nothing():
    assert zeroshot.compare(None, None, None, ZeroShot(enabled=False)) == \
           {"status": "off", "reason": "validate.zero_shot.enabled is false"}


def test_without_lm_eval_the_report_says_how_to_get_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval raises ImportError
    result = zeroshot.compare("dense", "pruned", "tok", SETTINGS)
    assert result["status"] == "skipped" and "pip install 'absorbdeploy[eval]'" in result["reason"]


def test_accuracy_per_task_and_its_mean_for_dense_then_pruned(lm_eval):
    lm_eval["answers"] = [{"results": {"boolq": {"acc,none": 0.75}, "rte": {"acc,none": 0.5}, "wsc": {"f1,none": 0.1}}},
                          {"results": {"boolq": {"acc,none": 0.25}, "rte": {"acc,none": 0.5}, "wsc": {}}}]
    result = zeroshot.compare("dense model", "pruned model", "tok", SETTINGS)
    assert result["status"] == "ok"
    assert result["dense"]["accuracy"] == {"boolq": 0.75, "rte": 0.5, "wsc": None}
    assert result["dense"]["mean"] == pytest.approx(0.625) and result["pruned"]["mean"] == pytest.approx(0.375)
    assert result["dense"]["limit"] == 20 and "HFLM" in result["dense"]["backend"] and "0-shot" in result["dense"]["backend"]
    assert [c[0] for c in lm_eval["hflm"]] == ["dense model", "pruned model"] and lm_eval["hflm"][0][1] == "tok"
    assert all(c["tasks"] == ["boolq", "rte", "wsc"] and c["num_fewshot"] == 0 and c["limit"] == 20
               for c in lm_eval["evaluate"])


def test_no_accuracy_at_all_gives_no_mean(lm_eval):
    lm_eval["answers"] = [{"results": {"wsc": {}}}]
    assert zeroshot.evaluate("m", "tok", SETTINGS)["mean"] is None


def test_tasks_missing_offline_skip_with_the_first_line_of_the_error(lm_eval):
    lm_eval["answers"] = [FileNotFoundError("boolq is not in the local datasets cache\nsee the hub for details")]
    result = zeroshot.compare("dense", "pruned", "tok", SETTINGS)
    assert result == {"status": "skipped", "reason": "lm-eval could not run the tasks offline (FileNotFoundError: boolq "
                                                     "is not in the local datasets cache)"}
    assert len(lm_eval["evaluate"]) == 1  # the pruned model is not tried once the dense one could not be
