"""Shared fixtures: the tiny random Llama, a tiny *trained* Llama (cached per session), SmolLM2 for slow tests, and a
guard that fails the session if a test leaves files in the working directory."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parent.parent
TESTS = REPO / "tests"
# Every test's tier is the folder it lives in (README, "Code layout": tests mirror the modules); `-m unit` is the fast
# loop. A test file anywhere else under tests/ is a collection error rather than a test without a tier.
MARK_BY_FOLDER = {"unit": "unit", "tiny": "tiny", "slow": "slow", "gpu": "gpu"}
MARK_BY_FILE = {"test_layout.py": "unit"}  # static checks of the source tree


def tier(path: Path) -> str | None:
    """The marker of a test file under tests/ ("unit", "tiny", "slow", "gpu"); None for a file outside tests/."""
    try:
        parts = Path(path).resolve().relative_to(TESTS).parts
    except ValueError:
        return None
    mark = MARK_BY_FOLDER.get(parts[0]) if len(parts) > 1 else MARK_BY_FILE.get(parts[0])
    if mark is None:
        raise pytest.UsageError(f"tests/{'/'.join(parts)}: a test lives in tests/unit, tests/tiny, tests/slow or "
                                f"tests/gpu (or is one of {', '.join(MARK_BY_FILE)}), which gives it its marker")
    return mark


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects by marker
def pytest_collection_modifyitems(config, items):
    for item in items:
        mark = tier(item.path)
        if mark is not None:
            item.add_marker(mark)


@pytest.fixture(scope="session", autouse=True)
def no_litter():
    before = set(os.listdir(REPO)) | set(os.listdir(os.getcwd()))
    yield
    after = set(os.listdir(REPO)) | set(os.listdir(os.getcwd()))
    ignored = {".pytest_cache", ".hypothesis", "__pycache__"}
    left = sorted(after - before - ignored)
    assert not left, f"tests left files behind: {left}"


def run_cli(*args, timeout: int = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    """The installed CLI in a subprocess, exactly as a user runs it."""
    return subprocess.run([sys.executable, "-m", "absorbdeploy", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


@pytest.fixture()
def tiny():
    from absorbdeploy.tiny import build_tiny_llama

    return build_tiny_llama()


@pytest.fixture(scope="session")
def tiny_trained_dir(tmp_path_factory) -> Path:
    """The tiny Llama after 300 AdamW steps on pydoc text bytes (val PPL about 7 instead of about 258), saved once."""
    from tests.helpers import train_tiny

    folder = tmp_path_factory.mktemp("tiny-trained")
    model, tokenizer = train_tiny(steps=300)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def smollm2():
    from absorbdeploy import load
    from absorbdeploy.source import resolve_source

    source = resolve_source(None)
    import torch

    return load.load(source, torch.device("cpu"))
