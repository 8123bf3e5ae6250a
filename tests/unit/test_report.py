"""The report's verdict and allocation sections, computed from plain inputs."""

from types import SimpleNamespace

from absorbdeploy import report
from absorbdeploy.exporters import Artifact
from absorbdeploy.prune import MatrixRecord
from absorbdeploy.recipe import Recipe, settle


def _outcome(zeros_per_block):
    records = [MatrixRecord(b, "q", 100, z, z, 0.1) for b, z in enumerate(zeros_per_block)]
    return SimpleNamespace(params=[100] * len(zeros_per_block), scores=[1.0, 2.0], base=[0.5, 0.5], final=[0.4, 0.6],
                           absorption={"coefficients": [-0.1, 0.2]}, records=records)


def test_allocation_section_reads_realised_sparsity_from_the_records():
    r, _ = settle(Recipe())
    section = report.allocation_section(r, _outcome([40, 60]))
    assert section["zeros"] == 100 and section["weights"] == 200 and section["exact"] is True
    assert [b["realised_sparsity"] for b in section["blocks"]] == [0.4, 0.6]
    assert [b["absorption_coeff"] for b in section["blocks"]] == [-0.1, 0.2]
    assert report.allocation_section(r, _outcome([40, 61]))["exact"] is False


def _checks(gates):
    result = {"runtime": "x", "ppl": 2.0, "top1_agreement": 1.0, "audit": {"sparsity": 0.5}}
    return {"artefacts": {"vllm": result}, "gates": gates, "dense_ppl": 1.0, "reference_ppl": 2.0, "runtimes": {},
            "dense_bytes": {"vllm": 400}}


def test_any_failed_gate_makes_exit_code_1_and_is_named():
    passed = {"gate": "min_top1_agreement", "artefact": "vllm", "value": 1.0, "limit": 0.99, "passed": True}
    failed = {"gate": "max_abs_logit_diff", "artefact": "vllm", "value": 0.5, "limit": 0.001, "passed": False}
    artefacts = {"vllm": Artifact("vllm", "/x/vllm", {"a": 100, "b": 100}, 1.0)}
    ok = report.validation_sections(_checks([passed]), artefacts, "bfloat16")
    assert ok["exit_code"] == 0 and ok["status"] == "passed" and ok["failed_gates"] == []
    assert ok["artefacts"]["vllm"]["bytes_ratio"] == 0.5 and ok["artefacts"]["vllm"]["realised_sparsity"] == 0.5
    bad = report.validation_sections(_checks([passed, failed]), artefacts, "bfloat16")
    assert bad["exit_code"] == 1 and bad["status"] == "failed" and bad["failed_gates"] == ["max_abs_logit_diff on vllm"]
