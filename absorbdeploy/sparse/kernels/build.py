"""Compile the C++ kernels (bitmask_linear.cpp and every isa_<name>.cpp) once and load them into `torch.ops.absorbdeploy`.

The shared object lives in `<cache>/<key>/absorbdeploy_kernels.so`, where `<cache>` is $ABSORBDEPLOY_KERNEL_CACHE or
~/.cache/absorbdeploy/kernels and `<key>` hashes the sources, the flags, torch's version and the compiler's
`--version`, so a change to any of them builds afresh. One shared object holds every ISA path (per-function target
attributes, no -march), so a cache built on an AVX-512 machine also runs on an AVX2-only one. Builds go through
torch.utils.cpp_extension.load (ninja) under an exclusive file lock, with the compiler's output kept in
`<cache>/<key>/build.log` rather than printed.
"""

import hashlib
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

NAME = "absorbdeploy_kernels"
HERE = Path(__file__).resolve().parent
# The op and its ISA table, then one file per ISA path (a new path is a new isa_<name>.cpp and its row in kIsaTable).
SOURCES = ("bitmask_linear.cpp", *sorted(p.name for p in HERE.glob("isa_*.cpp")))
HEADERS = tuple(sorted(p.name for p in HERE.glob("*.h")))
FLAGS = ("-O3",)
# at::parallel_for is inline OpenMP in torch's (GCC, libgomp) builds and runs serially without it; the GOMP symbols
# resolve to the libgomp torch already loaded. Clang would bring its own runtime (libomp), so it goes without.
GCC_FLAGS = ("-fopenmp",)


class BuildError(RuntimeError):
    """The kernels could not be compiled or loaded; the message says what is missing or where the log is."""


def cache_root() -> Path:
    return Path(os.environ.get("ABSORBDEPLOY_KERNEL_CACHE") or Path.home() / ".cache" / "absorbdeploy" / "kernels")


def compiler_identity() -> str:
    """First line of `$CXX --version` (CXX defaults to c++, as in torch.utils.cpp_extension); BuildError if it is
    missing or does not run, or if ninja is missing."""
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        raise BuildError(f"no C++ compiler: `{cxx}` not found (install g++ or clang++, or set CXX)")
    try:
        line = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=60, check=True).stdout
    except (OSError, subprocess.SubprocessError) as e:
        raise BuildError(f"the C++ compiler `{cxx}` does not run (`{cxx} --version` failed: {e})") from None
    interpreter_bin = str(Path(sys.executable).parent)  # pip's ninja lands here; on PATH only in an activated venv
    if shutil.which("ninja") is None and shutil.which("ninja", path=interpreter_bin):
        os.environ["PATH"] = interpreter_bin + os.pathsep + os.environ.get("PATH", "")
    if shutil.which("ninja") is None:
        raise BuildError("ninja not found (torch's extension builder needs it: pip install ninja, or apt install "
                         "ninja-build)")
    return f"{cxx}: {line.strip().splitlines()[0] if line.strip() else '?'}"


def flags(compiler: str) -> list[str]:
    return [*FLAGS, *(GCC_FLAGS if "clang" not in compiler.lower() else ())]


def build_key(compiler: str) -> str:
    import torch

    digest = hashlib.sha256()
    for name in SOURCES + HEADERS:
        digest.update(name.encode() + b"\0" + (HERE / name).read_bytes() + b"\0")
    digest.update("\0".join([torch.__version__, compiler, platform.machine(), *flags(compiler)]).encode())
    return digest.hexdigest()[:16]


def _compile(build_dir: Path, compiler: str) -> None:
    import contextlib
    import io
    import logging

    from torch.utils import cpp_extension

    captured = io.StringIO()
    logger = logging.getLogger(cpp_extension.__name__)  # its compiler-compatibility notice goes to the log only
    handler, level, propagate = logging.StreamHandler(captured), logger.level, logger.propagate
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    try:
        with contextlib.redirect_stdout(captured), contextlib.redirect_stderr(captured):
            cpp_extension.load(name=NAME, sources=[str(HERE / s) for s in SOURCES], extra_cflags=flags(compiler),
                               build_directory=str(build_dir), verbose=False, is_python_module=False)
    except Exception as e:  # cpp_extension raises RuntimeError, OSError, subprocess errors ...
        log = build_dir / "build.log"
        log.write_text(f"{captured.getvalue()}\n{e}\n")
        raise BuildError(f"compiling the kernels failed ({type(e).__name__}; compiler output in {log})") from None
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        logger.propagate = propagate


def load() -> Path:
    """Build if needed and load the kernels into torch.ops.absorbdeploy; returns the shared object's path.

    Raises BuildError: no compiler or ninja, a failed compile, or a shared object that does not load.
    """
    import fcntl

    import torch

    compiler = compiler_identity()
    library = cache_root() / build_key(compiler) / f"{NAME}.so"
    if not library.exists():
        library.parent.mkdir(parents=True, exist_ok=True)
        with open(library.parent.parent / f"{library.parent.name}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # another process may be building the same key; wait for it
            if not library.exists():
                _compile(library.parent, compiler)
    try:
        torch.ops.load_library(str(library))
    except OSError as e:
        raise BuildError(f"loading {library} failed: {e}") from None
    return library
