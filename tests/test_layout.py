"""The project's shape: required top level, one exporter file per FORMATS entry with identical verbs, small modules,
layered imports without circles, and the README's test command in CI."""

import ast
import inspect
from pathlib import Path

import pytest

from absorbdeploy import exporters

REPO = Path(__file__).resolve().parent.parent

# Each module may import modules of its own layer or below, never above (README, "Code layout").
LAYERS = [
    {"errors", "version"},
    {"masks", "sparsegpt", "esd", "bitmask", "prune", "allocate", "absorb"},  # pure math over tensors
    {"source", "checkpoint", "blocks", "data", "runners", "latency", "tiny", "atomic", "progress", "kernels",
     "sparse_linear", "compare"},
    {"calibrate", "prune_blocks", "probe", "load", "stream", "exporters", "validate", "zeroshot", "plots", "render",
     "hf_bitmask", "vllm_bitmask", "vllm_plugin"},
    {"recipe_rules", "recipe"},  # the configuration validates against the tables below it
    {"report", "pipeline", "serve"},
    {"cli", "__main__", "__init__"},  # the package's __init__ registers the bitmask format with transformers
]
VERBS = ("export", "load", "describe", "tensors")
DECLARATIONS = {"FORMAT": str, "RUNTIMES": dict, "STREAM_BY_TENSORS": bool, "SERVES_CHECKPOINT": bool, "TIMED": bool}


def test_required_top_level_exists():
    for name in ("absorbdeploy", "recipes", "exporters", "tests", "bench", "pyproject.toml", "Dockerfile", "README.md", ".ci/run"):
        assert (REPO / name).exists(), name


def test_formats_table_and_exporter_files_agree():
    files = {p.stem for p in (REPO / "exporters").glob("*.py") if p.stem != "__init__"}
    assert files == {fmt.module for fmt in exporters.FORMATS.values()}


@pytest.mark.parametrize("name", [n for n in exporters.FORMATS if not exporters.missing_modules(n)])
def test_every_exporter_has_the_same_verbs_and_declarations(name):
    module, reference = exporters.get(name), exporters.get("compressed-safetensors")
    for verb in VERBS:
        mine, theirs = inspect.signature(getattr(module, verb)), inspect.signature(getattr(reference, verb))
        assert list(mine.parameters) == list(theirs.parameters), (name, verb, mine, theirs)
    for attribute, kind in DECLARATIONS.items():
        assert isinstance(getattr(module, attribute), kind), (name, attribute)
    assert module.FORMAT == name


def _modules():
    for folder, package in (("absorbdeploy", "absorbdeploy"), ("exporters", "absorbdeploy.exporters")):
        for path in (REPO / folder).rglob("*.py"):
            parts = path.relative_to(REPO / folder).with_suffix("").parts
            yield path, ".".join((package, *parts))


def _imports(path: Path) -> set[str]:
    """Every absorbdeploy module a file imports, at module level or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("absorbdeploy"):
            found |= {f"{node.module}.{a.name}" if node.module == "absorbdeploy" else node.module for a in node.names}
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("absorbdeploy")}
    return found


def _layer(module: str) -> int:
    parts = module.split(".")
    name = parts[1] if len(parts) > 1 else "__init__"
    return next(i for i, names in enumerate(LAYERS) if name in names)


def test_no_module_imports_a_layer_above_its_own():
    upward = []
    for path, module in _modules():
        for target in _imports(path):
            if _layer(target) > _layer(module):
                upward.append(f"{module} -> {target}")
    assert not upward, upward


def test_no_import_circle():
    graph: dict[str, set] = {_top(module): set() for _, module in _modules()}
    for path, module in _modules():
        graph[_top(module)] |= {_top(t) for t in _imports(path)} - {_top(module)}
    state: dict[str, int] = {}

    def visit(node, trail):
        state[node] = 1
        for nxt in graph.get(node, ()):
            assert state.get(nxt) != 1, " -> ".join(trail + [node, nxt])
            if nxt not in state:
                visit(nxt, trail + [node])
        state[node] = 2

    for node in graph:
        if node not in state:
            visit(node, [])


def _top(module: str) -> str:
    """absorbdeploy.exporters.vllm -> absorbdeploy.exporters.vllm; absorbdeploy.kernels.ops -> absorbdeploy.kernels"""
    parts = module.split(".")
    return ".".join(parts[:3]) if parts[1:2] == ["exporters"] else ".".join(parts[:2])


def test_modules_stay_small():
    for path, _ in _modules():
        code = [l for l in path.read_text().splitlines() if l.strip() and not l.strip().startswith("#")]
        assert len(code) <= 300, f"{path.name}: {len(code)} code lines"


def test_ci_runs_the_readme_test_command_verbatim():
    readme = (REPO / "README.md").read_text()
    ci = (REPO / ".ci/run").read_text()
    command = "./install.sh && .venv/bin/python -m pytest"
    assert f"\n{command}  " in readme or f"\n{command}\n" in readme
    assert f"'{command}'" in ci


def test_no_unsafe_loading_in_the_package():
    """No pickle, torch.load only with weights_only=True, YAML only through a SafeLoader, remote code off by default."""
    import re

    for path, _ in _modules():
        text = path.read_text()
        assert "import pickle" not in text and "pickle.load" not in text, path.name
        for call in re.findall(r"torch\.load\([^)]*\)", text):
            assert "weights_only=True" in call, (path.name, call)
        for call in re.findall(r"yaml\.load\([^)]*\)", text):
            assert "Loader=_Loader" in call, (path.name, call)
        assert "trust_remote_code=True" not in text, path.name
    from absorbdeploy import recipe

    assert issubclass(recipe._Loader, __import__("yaml").SafeLoader)
