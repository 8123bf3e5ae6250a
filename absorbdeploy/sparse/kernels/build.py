"""Compile the C++ kernels (bitmask_linear.cpp and every isa_<name>.cpp) once and load them into `torch.ops.absorbdeploy`.

The shared object lives in `<cache>/<key>/absorbdeploy_kernels.so`, where `<cache>` is $ABSORBDEPLOY_KERNEL_CACHE or
~/.cache/absorbdeploy/kernels and `<key>` hashes the sources, torch's version and the machine, so a change to any of
them builds afresh. One shared object holds every ISA path (per-function target attributes, no -march), so a cache
built on an AVX-512 machine also runs on an AVX2-only one. Builds go through torch.utils.cpp_extension.load (ninja)
under an exclusive file lock, with the compiler's output kept in `<cache>/<key>/build.log` rather than printed.

Nothing runs that we did not build (as ssh treats key files and pip hash-checked installs): a successful build writes
a record beside the library (`absorbdeploy_kernels.json`: its sha256, the compiler and flags; written atomically),
and a library is loaded only when its bytes match that record. A planted, truncated or record-less library is
rebuilt; a cache directory writable by group or others is refused. The key does not depend on the compiler, so a
prebuilt kernel runs where no compiler is installed (a slim runtime image); where one is, a different compiler than
the record's rebuilds.
"""

import hashlib
import json
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


RECORD = f"{NAME}.json"


class BuildError(RuntimeError):
    """The kernels could not be compiled or loaded; the message says what is missing or where the log is."""


def cache_root() -> Path:
    return Path(os.environ.get("ABSORBDEPLOY_KERNEL_CACHE") or Path.home() / ".cache" / "absorbdeploy" / "kernels")


def compiler_identity() -> str:
    """First line of `$CXX --version` (CXX defaults to c++, as in torch.utils.cpp_extension); BuildError if it is
    missing or does not run, or if ninja is missing."""
    cxx = os.environ.get("CXX", "c++")
    if compiler_missing():
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


def compiler_missing() -> bool:
    """No C++ compiler on this machine (CXX, default c++, not found): building is impossible rather than broken."""
    return shutil.which(os.environ.get("CXX", "c++")) is None


def flags(compiler: str) -> list[str]:
    return [*FLAGS, *(GCC_FLAGS if "clang" not in compiler.lower() else ())]


def build_key() -> str:
    """16 hex digits over the sources, headers, torch's version and the machine (not the compiler: see above)."""
    import torch

    digest = hashlib.sha256()
    for name in SOURCES + HEADERS:
        digest.update(name.encode() + b"\0" + (HERE / name).read_bytes() + b"\0")
    digest.update("\0".join([torch.__version__, platform.machine()]).encode())
    return digest.hexdigest()[:16]


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_private(directory: Path) -> None:
    """BuildError when `directory` (or the cache root above it) is writable by group or others: anyone who can
    write there could plant a library that this process would run."""
    root = cache_root()
    for folder in (root, directory):
        if folder.exists() and folder.stat().st_mode & 0o022:
            raise BuildError(f"refusing the kernel cache {folder}: it is writable by group or others "
                             f"(mode {folder.stat().st_mode & 0o777:o}; chmod go-w {folder}, or set "
                             "ABSORBDEPLOY_KERNEL_CACHE to a private directory)")


def verified(library: Path, compiler: str | None) -> bool:
    """The library exists, its sha256 matches the record written when we built it, and, where a compiler is
    present, the record's compiler is this one."""
    try:
        record = json.loads((library.parent / RECORD).read_text())
        if record.get("sha256") != _sha256(library):
            return False
    except (OSError, ValueError, AttributeError):
        return False
    return compiler is None or record.get("compiler") == compiler


def _write_record(library: Path, compiler: str) -> None:
    temporary = library.parent / f".{RECORD}.{os.getpid()}"
    temporary.write_text(json.dumps({"sha256": _sha256(library), "compiler": compiler, "flags": flags(compiler)}))
    os.replace(temporary, library.parent / RECORD)


# Run in a child process: cpp_extension.load also loads what it built into its process (before our record exists) and
# renames a second build of the same name in one process (absorbdeploy_kernels_v1.so).
_BUILD_CHILD = """
import sys
from torch.utils import cpp_extension
name, build_dir, flags, *sources = sys.argv[1:]
cpp_extension.load(name=name, sources=sources, extra_cflags=flags.split(), build_directory=build_dir, verbose=True,
                   is_python_module=False)
"""


def _compile(build_dir: Path, compiler: str) -> None:
    """Compile and link `<build_dir>/absorbdeploy_kernels.so` with torch.utils.cpp_extension (ninja) in a child
    process, its output in `<build_dir>/build.log`. Raises BuildError naming that log."""
    log = build_dir / "build.log"
    command = [sys.executable, "-c", _BUILD_CHILD, NAME, str(build_dir), " ".join(flags(compiler)),
               *(str(HERE / s) for s in SOURCES)]
    with open(log, "w") as out:
        try:
            done = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, timeout=1800)
        except (OSError, subprocess.SubprocessError) as e:
            out.write(f"\n{e}\n")
            raise BuildError(f"compiling the kernels failed ({type(e).__name__}; compiler output in {log})") from None
    if done.returncode != 0 or not (build_dir / f"{NAME}.so").is_file():
        raise BuildError(f"compiling the kernels failed (exit {done.returncode}; compiler output in {log})")


def load() -> Path:
    """Build if needed and load the kernels into torch.ops.absorbdeploy; returns the shared object's path.

    Raises BuildError: a cache directory writable by others or one that cannot be created, no compiler (or ninja) and
    no verified prebuilt library, a failed compile, or a shared object that does not load.
    """
    import fcntl

    import torch

    directory = cache_root() / build_key()
    library = directory / f"{NAME}.so"
    check_private(directory)
    try:
        compiler = compiler_identity()
    except BuildError:
        if not verified(library, None):
            raise
        compiler = None  # no compiler here: the library we built and recorded earlier runs
    if compiler is not None and not verified(library, compiler):
        try:
            directory.mkdir(mode=0o755, parents=True, exist_ok=True)
            with open(directory.parent / f"{directory.name}.lock", "w") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)  # another process may be building the same key; wait for it
                if not verified(library, compiler):
                    for stale in (directory / RECORD, library):
                        stale.unlink(missing_ok=True)
                    _compile(directory, compiler)
                    _write_record(library, compiler)
        except OSError as e:
            raise BuildError(f"cannot write the kernel cache {directory}: {e.strerror or e}") from None
        if not verified(library, compiler):
            raise BuildError(f"{library} does not match the record of its build")
    try:
        torch.ops.load_library(str(library))
    except OSError as e:
        raise BuildError(f"loading {library} failed: {e}") from None
    return library
