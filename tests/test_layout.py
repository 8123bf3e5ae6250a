"""The project's shape: required top level, one exporter file per FORMATS entry with identical verbs, small modules,
layered imports without circles, a mirrored test file for every module with logic, and the README's test command in
CI."""

import ast
import inspect
from pathlib import Path

import pytest

from absorbdeploy import exporters

REPO = Path(__file__).resolve().parent.parent

# Each module may import modules of its own layer or below, never above (README, "Code layout"). Modules of the
# sparse/ folder are named `sparse.<module>` (sparse.kernels for its kernels package).
LAYERS = [
    {"errors", "version", "sparse.codec", "sparse.integrity"},  # the codec imports nothing of ours
    {"masks", "sparsegpt", "esd", "prune", "update", "allocate", "absorb", "prune_plan"},  # pure math over tensors, the prune plan
    {"source", "checkpoint", "blocks", "data", "runners", "vllm_runner", "latency", "tiny", "atomic", "progress",
     "compare", "sparse.kernels", "sparse.linear"},
    {"calibrate", "reconstruct", "prune_blocks", "probe", "load", "stream", "export_files", "exporters", "validate", "zeroshot",
     "plots", "render", "sparse.hf", "sparse.vllm", "sparse.directory", "sparse"},
    {"recipe_rules", "recipe_sections", "recipe"},  # the configuration validates against the tables below it
    {"report", "pipeline", "serve"},
    {"cli", "__main__", "__init__"},  # the package's __init__ registers the bitmask format with transformers
]
# What the served-sparse folder may import from outside itself: nothing above the model and data access layer.
SPARSE_MAY_IMPORT = {"absorbdeploy.errors", "absorbdeploy.source", "absorbdeploy.checkpoint"}
VERBS = ("export", "load", "describe", "tensors")
DECLARATIONS = {"FORMAT": str, "RUNTIMES": dict, "STREAM_BY_TENSORS": bool, "SERVES_CHECKPOINT": bool, "TIMED": bool,
                "CHOOSES_DTYPE": bool}


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


def _name(module: str) -> str:
    """absorbdeploy.stream -> stream; absorbdeploy.sparse.kernels.ops -> sparse.kernels; absorbdeploy -> __init__"""
    parts = module.split(".")
    if len(parts) == 1:
        return "__init__"
    return ".".join(parts[1:3]) if parts[1] == "sparse" and len(parts) > 2 and parts[2] != "__init__" else parts[1]


def _layer(module: str) -> int:
    return next(i for i, names in enumerate(LAYERS) if _name(module) in names)


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
    """absorbdeploy.exporters.vllm -> itself; absorbdeploy.sparse.kernels.ops -> absorbdeploy.sparse.kernels"""
    parts = module.split(".")
    return ".".join(parts[:3]) if parts[1:2] in (["exporters"], ["sparse"]) else ".".join(parts[:2])


def test_the_sparse_folder_imports_nothing_above_it_and_the_codec_nothing_of_ours():
    outside = []
    for path, module in _modules():
        if module.startswith("absorbdeploy.sparse."):
            targets = {t for t in _imports(path) if not t.startswith("absorbdeploy.sparse")}
            if module == "absorbdeploy.sparse.codec":
                assert not targets and not _imports(path), _imports(path)
            outside += [f"{module} -> {t}" for t in targets - SPARSE_MAY_IMPORT]
    assert not outside, outside


def test_one_isa_table_gives_the_build_its_sources():
    """Every isa_<name>.cpp is compiled and has its row in kIsaTable; nothing else names an ISA path's file."""
    from absorbdeploy.sparse.kernels import build

    folder = REPO / "absorbdeploy/sparse/kernels"
    isa_files = sorted(p.name for p in folder.glob("isa_*.cpp"))
    assert list(build.SOURCES) == ["bitmask_linear.cpp", *isa_files]
    table = (folder / "bitmask_linear.cpp").read_text()
    for name in isa_files:
        entry = "kIsa" + name[len("isa_"):-len(".cpp")].capitalize()
        assert f"&{entry}," in table and f"const IsaPath {entry} = {{" in (folder / name).read_text(), entry


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


# Tests mirror the modules (README, "Code layout"): absorbdeploy/<sub>/<module>.py is tested by
# tests/<tier>/<sub>/test_<module>.py and exporters/<module>.py by tests/<tier>/exporters/test_<module>.py, for a tier
# of TEST_TIERS (the folder gives the marker, tests/conftest.py). A module is either mirrored, tested in the file that
# TESTED_IN names, or listed in NOT_MIRRORED with the reason it has no test file of its own.
TEST_TIERS = ("unit", "tiny", "slow")
NOT_MIRRORED = {
    "absorbdeploy/__init__.py": "registers the bitmask format when transformers is imported (tests/tiny/sparse/test_hf.py "
                                "loads through it)",
    "absorbdeploy/__main__.py": "`python -m absorbdeploy` calls cli.main (every run_cli test runs it)",
    "absorbdeploy/version.py": "one constant",
    "absorbdeploy/errors.py": "one exception class (every refusal test checks its one-line message)",
    "absorbdeploy/sparse/__init__.py": "a docstring",
    "absorbdeploy/sparse/kernels/__init__.py": "re-exports kernels/ops.py",
    "absorbdeploy/sparse/kernels/__main__.py": "an argparse wrapper of build.load (install.sh runs it; "
                                               "tests/unit/sparse/kernels/test_build.py tests load)",
}
TESTED_IN = {
    "absorbdeploy/recipe_sections.py": "tests/unit/test_recipe.py",  # part of the recipe tree: loaded, typed, overridden there
    "exporters/__init__.py": "tests/unit/test_exporters.py",  # the registry, named after its package
    # every format in one file parametrized over exporters.FORMATS: export, reload in its runtime, describe
    "exporters/bitmask.py": "tests/tiny/test_exporters.py",
    "exporters/compressed_safetensors.py": "tests/tiny/test_exporters.py",
    "exporters/onnx.py": "tests/tiny/test_exporters.py",
    "exporters/vllm.py": "tests/tiny/test_exporters.py",
}


def _mirrors(module: Path) -> list[Path]:
    """absorbdeploy/sparse/kernels/ops.py -> tests/<tier>/sparse/kernels/test_ops.py for every tier."""
    relative = module.relative_to(REPO)
    inside = relative.relative_to("absorbdeploy") if relative.parts[0] == "absorbdeploy" else relative
    return [REPO / "tests" / tier / inside.parent / f"test_{inside.name}" for tier in TEST_TIERS]


def test_every_module_with_logic_has_its_mirrored_test_file():
    missing, stale = [], []
    for path, _ in _modules():
        name = str(path.relative_to(REPO))
        mirrored = [p for p in _mirrors(path) if p.is_file()]
        if name in TESTED_IN:
            assert (REPO / TESTED_IN[name]).is_file(), f"{name}: TESTED_IN names {TESTED_IN[name]}, which does not exist"
        elif name in NOT_MIRRORED:
            if mirrored:
                stale.append(f"{name} has {mirrored[0].relative_to(REPO)}: take it out of NOT_MIRRORED")
        elif not mirrored:
            missing.append(f"{name}: expected one of {', '.join(str(p.relative_to(REPO)) for p in _mirrors(path))}")
    assert not missing, "modules without their test file:\n" + "\n".join(missing)
    assert not stale, stale
    known = {str(p.relative_to(REPO)) for p, _ in _modules()}
    assert set(NOT_MIRRORED) | set(TESTED_IN) <= known, (set(NOT_MIRRORED) | set(TESTED_IN)) - known
    assert all(reason.strip() for reason in NOT_MIRRORED.values())


def test_every_test_folder_is_a_package():
    """Mirrored names repeat across tiers (tests/tiny/test_exporters.py, tests/unit/test_exporters.py): each folder
    needs its __init__.py so that pytest imports both."""
    folders = {p.parent for p in (REPO / "tests").rglob("test_*.py")}
    assert all((f / "__init__.py").is_file() for f in folders), sorted(str(f) for f in folders if not (f / "__init__.py").is_file())
