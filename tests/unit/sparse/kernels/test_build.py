"""Building the kernels: where the cache lives, a cache key that changes with every source, header, flag and compiler
(so a change never loads a stale library), the flags per compiler, and BuildError naming what is missing or where the
compiler's output went. The successful build and the fallback to the reference are in test_ops.py."""

import os
import shutil
import sys
from pathlib import Path

import pytest

from absorbdeploy.sparse.kernels import build

NINJA = shutil.which("ninja") or shutil.which("ninja", path=str(Path(sys.executable).parent))


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


def test_the_key_changes_with_any_source_header_or_compiler(sources):
    compiler = "c++: c++ (GCC) 13.3.0"
    key = build.build_key(compiler)
    assert len(key) == 16 and int(key, 16) >= 0 and build.build_key(compiler) == key
    seen = {key}
    for name in (build.SOURCES[0], build.SOURCES[-1], build.HEADERS[0]):
        (sources / name).write_text((sources / name).read_text() + "\n// edited\n")
        seen.add(build.build_key(compiler))
    seen.add(build.build_key("c++: c++ (GCC) 14.1.0"))
    seen.add(build.build_key("clang++: clang 18"))  # other flags too
    assert len(seen) == 6


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
    cxx = _script(bare / "bin" / "cxx", '[ "$1" = --version ] && { echo "broken 1.0"; exit 0; }\n'
                                       'echo "error: this compiler compiles nothing" >&2\nexit 1\n')
    monkeypatch.setenv("CXX", cxx)
    key = build.build_key(f"{cxx}: broken 1.0")
    with pytest.raises(build.BuildError) as failed:
        build.load()
    log = bare / "cache" / key / "build.log"
    assert str(log) in str(failed.value) and "this compiler compiles nothing" in log.read_text()
    assert not (bare / "cache" / key / f"{build.NAME}.so").exists()
