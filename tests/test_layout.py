"""The project's shape: required top level, one exporter file per FORMATS entry, small modules."""

from pathlib import Path

from absorbdeploy import exporters

REPO = Path(__file__).resolve().parent.parent


def test_required_top_level_exists():
    for name in ("absorbdeploy", "recipes", "exporters", "tests", "bench", "pyproject.toml", "Dockerfile", "README.md", ".ci/run"):
        assert (REPO / name).exists(), name


def test_formats_table_and_exporter_files_agree():
    files = {p.stem for p in (REPO / "exporters").glob("*.py") if p.stem != "__init__"}
    assert files == {module for module, _, _ in exporters.FORMATS.values()}
    for name in exporters.FORMATS:
        module = exporters.get(name) if not exporters.missing_modules(name) else None
        if module is not None:
            for verb in ("export", "load", "describe"):
                assert callable(getattr(module, verb)), (name, verb)


def test_modules_stay_small():
    for folder in ("absorbdeploy", "exporters"):
        for path in (REPO / folder).glob("*.py"):
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

    for folder in ("absorbdeploy", "exporters"):
        for path in (REPO / folder).glob("*.py"):
            text = path.read_text()
            assert "import pickle" not in text and "pickle.load" not in text, path.name
            for call in re.findall(r"torch\.load\([^)]*\)", text):
                assert "weights_only=True" in call, (path.name, call)
            for call in re.findall(r"yaml\.load\([^)]*\)", text):
                assert "Loader=_Loader" in call, (path.name, call)
            assert "trust_remote_code=True" not in text, path.name
    from absorbdeploy import recipe

    assert issubclass(recipe._Loader, __import__("yaml").SafeLoader)
