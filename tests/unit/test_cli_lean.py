"""--help and bad input return without importing torch, transformers, onnx or vllm (like Typer's test_rich_import)."""

import subprocess
import sys

import pytest

PROBE = """
import sys
from absorbdeploy.cli import main
sys.argv = ["absorbdeploy", *{args!r}]
code = 0
try:
    main()
except SystemExit as e:
    code = e.code
heavy = sorted(m for m in ("torch", "transformers", "onnx", "onnxruntime", "vllm") if m in sys.modules)
print("HEAVY=" + ",".join(heavy), file=sys.stderr)
sys.exit(code)
"""


@pytest.mark.parametrize(
    "args, code",
    [
        (["--help"], 0),
        (["prune-and-export", "--help"], 0),
        (["list-recipes"], 0),
        (["list-formats"], 0),
        (["serve", "--help"], 0),
        (["serve", "/no/such/dir"], 2),
        (["prune-and-export", "--recipe", "no-such-recipe"], 2),
        (["prune-and-export", "/no/such/model"], 2),
        (["prune-and-export", "--set", "prune.sparsity=2"], 2),
    ],
)
def test_cli_stays_lean(args, code):
    proc = subprocess.run([sys.executable, "-c", PROBE.format(args=args)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == code, proc.stderr
    assert "HEAVY=\n" in proc.stderr or proc.stderr.rstrip().endswith("HEAVY="), proc.stderr
