"""Building the kernels: where the cache lives, a cache key that changes with every source and header but not with the
compiler (a prebuilt library runs where none is installed), the flags per compiler, BuildError naming what is missing or
where the compiler's output went, and a cache that loads only what we built and recorded: planted, truncated and
record-less libraries are rebuilt or refused, a cache writable by others is refused, an uncreatable one falls back.
The successful build and the fallback to the reference are in test_ops.py."""

import os
import shutil
import sys
from pathlib import Path

import pytest

from absorbdeploy.sparse.kernels import build

NINJA = shutil.which("ninja") or shutil.which("ninja", path=str(Path(sys.executable).parent))
PYTHON = sys.executable  # the `bare` fixture hides it; the compile itself runs in a child of the real interpreter


def test_the_cache_is_the_variable_or_under_home(monkeypatch, tmp_path):
    monkeypatch.setenv("ABSORBDEPLOY_KERNEL_CACHE", str(tmp_path / "cache"))
    assert build.cache_root() == tmp_path / "cache"
    monkeypatch.setenv("ABSORBDEPLOY_KERNEL_CACHE", "")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert build.cache_root() == tmp_path / "home" / ".cache" / "absorbdeploy" / "kernels"


def test_openmp_only_with_gcc():
    assert build.flags("c++: c++ (Ubuntu 13.3.0) 13.3.0") == ["-O3", "-fopenmp"]
    assert build.flags("clang++: Ubuntu clang version 18.1.3") == ["-O3"]


@pytest.fixture()
def sources(monkeypatch, tmp_path):
    """A copy of the kernel sources that build_key reads instead of the package's."""
    copy = tmp_path / "kernels"
    copy.mkdir()
    for name in build.SOURCES + build.HEADERS:
        shutil.copy(build.HERE / name, copy / name)
    monkeypatch.setattr(build, "HERE", copy)
    return copy


def test_the_key_changes_with_any_source_or_header_but_not_the_compiler(sources, monkeypatch):
    key = build.build_key()
    assert len(key) == 16 and int(key, 16) >= 0 and build.build_key() == key
    monkeypatch.setenv("CXX", "clang++-absent")
    assert build.build_key() == key
    seen = {key}
    for name in (build.SOURCES[0], build.SOURCES[-1], build.HEADERS[0]):
        (sources / name).write_text((sources / name).read_text() + "\n// edited\n")
        seen.add(build.build_key())
    assert len(seen) == 4


def _script(path: Path, body: str) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)
    return str(path)


@pytest.fixture()
def bare(monkeypatch, tmp_path):
    """PATH and the interpreter's folder without a compiler or ninja; the cache in tmp_path."""
    (tmp_path / "bin").mkdir()
    (tmp_path / "python" / "bin").mkdir(parents=True)
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    monkeypatch.setattr(sys, "executable", str(tmp_path / "python" / "bin" / "python"))
    monkeypatch.setenv("ABSORBDEPLOY_KERNEL_CACHE", str(tmp_path / "cache"))
    return tmp_path


def test_no_compiler_or_one_that_does_not_run_is_a_build_error(bare, monkeypatch):
    monkeypatch.setenv("CXX", "g++-absent")
    with pytest.raises(build.BuildError, match=r"no C\+\+ compiler: `g\+\+-absent` not found"):
        build.compiler_identity()
    with pytest.raises(build.BuildError, match="no C"):
        build.load()
    assert not (bare / "cache").exists()  # nothing created before there is something to build
    monkeypatch.setenv("CXX", "/bin/false")
    with pytest.raises(build.BuildError, match=r"`/bin/false --version` failed"):
        build.compiler_identity()


def test_the_compiler_is_named_by_its_version_line_and_ninja_is_found_beside_python(bare, monkeypatch):
    cxx = _script(bare / "bin" / "cxx", 'echo "fakecc 9.9 (test)"\necho "second line"\n')
    monkeypatch.setenv("CXX", cxx)
    with pytest.raises(build.BuildError, match="ninja not found"):
        build.compiler_identity()
    _script(bare / "python" / "bin" / "ninja", "exit 0\n")  # pip's ninja: beside the interpreter, not on PATH
    assert build.compiler_identity() == f"{cxx}: fakecc 9.9 (test)"
    assert os.environ["PATH"].split(os.pathsep)[0] == str(bare / "python" / "bin")


@pytest.mark.skipif(NINJA is None, reason="no ninja to run the build")
def test_a_failed_compile_keeps_the_compiler_output_in_the_build_log(bare, monkeypatch):
    monkeypatch.setenv("PATH", os.pathsep.join([str(bare / "bin"), str(Path(NINJA).parent)]))
    monkeypatch.setattr(sys, "executable", PYTHON)
    cxx = _script(bare / "bin" / "cxx", '[ "$1" = --version ] && { echo "broken 1.0"; exit 0; }\n'
                                       'echo "error: this compiler compiles nothing" >&2\nexit 1\n')
    monkeypatch.setenv("CXX", cxx)
    key = build.build_key()
    with pytest.raises(build.BuildError) as failed:
        build.load()
    log = bare / "cache" / key / "build.log"
    assert str(log) in str(failed.value) and "this compiler compiles nothing" in log.read_text()
    assert not (bare / "cache" / key / f"{build.NAME}.so").exists()


@pytest.fixture()
def fake_build(bare, monkeypatch):
    """A compiler that `compiler_identity` accepts and a `_compile` that writes a known library, so that the cache's
    decisions (rebuild or load) are observed without a real compile; torch's loader records what it was given."""
    monkeypatch.setattr(build, "compiler_identity", lambda: "fakecc: 1.0")
    compiles, loaded = [], []

    def compile_(directory, compiler):
        (directory / f"{build.NAME}.so").write_bytes(b"built by absorbdeploy")
        compiles.append(directory)

    monkeypatch.setattr(build, "_compile", compile_)
    import torch

    monkeypatch.setattr(torch.ops, "load_library", lambda path: loaded.append(Path(path).read_bytes()))
    return compiles, loaded


def _library():
    return build.cache_root() / build.build_key() / f"{build.NAME}.so"


@pytest.mark.parametrize("planted", ["a foreign library, no record", "a truncated library", "a record of other bytes"])
def test_a_library_that_does_not_match_its_record_is_rebuilt_before_anything_loads(fake_build, planted):
    compiles, loaded = fake_build
    build.load()
    assert len(compiles) == 1 and loaded == [b"built by absorbdeploy"]
    library = _library()
    if planted == "a foreign library, no record":
        (library.parent / build.RECORD).unlink()
        library.write_bytes(b"\x7fELF planted")
    elif planted == "a truncated library":
        library.write_bytes(library.read_bytes()[:5])
    else:
        (library.parent / build.RECORD).write_text('{"sha256": "00", "compiler": "fakecc: 1.0"}')
    build.load()
    assert len(compiles) == 2 and loaded[-1] == b"built by absorbdeploy"
    build.load()  # verified now: loaded as is
    assert len(compiles) == 2 and loaded[-1] == b"built by absorbdeploy"


def test_another_compiler_rebuilds_and_no_compiler_loads_the_recorded_library(fake_build, monkeypatch):
    compiles, loaded = fake_build
    build.load()
    monkeypatch.setattr(build, "compiler_identity", lambda: "othercc: 2.0")
    build.load()
    assert len(compiles) == 2

    def missing():
        raise build.BuildError("no C++ compiler: `c++` not found")

    monkeypatch.setattr(build, "compiler_identity", missing)
    build.load()
    assert len(compiles) == 2 and loaded[-1] == b"built by absorbdeploy"
    _library().write_bytes(b"tampered")
    with pytest.raises(build.BuildError, match="no C"):  # nothing verified and nothing to build with
        build.load()
    assert loaded[-1] == b"built by absorbdeploy"


@pytest.mark.parametrize("where", ["root", "key"])
def test_a_cache_writable_by_group_or_others_is_refused(fake_build, where):
    compiles, loaded = fake_build
    build.load()
    folder = build.cache_root() if where == "root" else _library().parent
    folder.chmod(0o775)
    with pytest.raises(build.BuildError, match=f"refusing the kernel cache {folder}: it is writable by group or "
                                               "others \\(mode 775"):
        build.load()
    assert len(loaded) == 1


def test_an_uncreatable_cache_is_a_build_error(fake_build, monkeypatch, tmp_path):
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("ABSORBDEPLOY_KERNEL_CACHE", str(tmp_path / "file" / "cache"))
    with pytest.raises(build.BuildError, match="cannot write the kernel cache"):
        build.load()
