"""All-or-nothing output directories: everything is written to `DIR.tmp/` and renamed to `DIR/` only when complete.

A run that fails or is interrupted leaves no `DIR/`. A stale `DIR.tmp/` from a killed run is reported (it carries a marker
file with the pid that wrote it) and replaced only when that process is gone, so two runs never share a staging folder.
"""

import os
import shutil
import sys
from pathlib import Path

from absorbdeploy.errors import UserError

MARKER = ".absorbdeploy-staging"


def check_destination(out: Path, overwrite: bool, inputs=()) -> None:
    """Bad-input checks on the output path, before any work starts; nothing is created here. `inputs` are the files
    and directories the run reads (model, weight files, texts, recipe): the output may not be, contain or lie inside
    any of them, symlinks resolved, or --overwrite would delete them."""
    for path in inputs:
        _refuse_overlap(out, Path(path))
    if Path.cwd().resolve().is_relative_to(Path(out).resolve()):
        raise UserError(f"output {out} is or contains the current directory, which --overwrite would replace; choose another --out")
    if out.exists() and not out.is_dir():
        raise UserError(f"output path {out} exists and is a file; choose another --out")
    if out.exists() and not overwrite:
        raise UserError(f"output directory {out} already exists; pass --overwrite to replace it or choose another --out")
    parent = out.resolve().parent
    existing = parent
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir() or not _writable(existing):
        raise UserError(f"cannot write to {existing} (permission denied or read-only); choose another --out")
    staging = staging_path(out)
    if staging.exists():
        owner = _owner(staging)
        if owner is not None and _alive(owner):
            raise UserError(f"{staging} is in use by a running absorbdeploy (pid {owner}); wait for it or choose another --out")


def _refuse_overlap(out: Path, source: Path) -> None:
    real = source.resolve()
    for target in (out, staging_path(out)):
        mine = target.resolve()
        if mine == real or real.is_relative_to(mine) or mine.is_relative_to(real):
            how = "is" if mine == real else ("contains" if real.is_relative_to(mine) else "lies inside")
            raise UserError(f"output {target} {how} the input {source}; choose an --out outside every input")


def _writable(folder: Path) -> bool:
    """Really try: os.access says yes to root on read-only or virtual file systems."""
    import tempfile

    try:
        with tempfile.TemporaryDirectory(dir=folder, prefix=".absorbdeploy-probe-"):
            return True
    except OSError:
        return False


def staging_path(out: Path) -> Path:
    out = Path(out)
    if out.name in ("", ".", ".."):
        out = Path(os.path.abspath(out))
    return out.with_name(out.name + ".tmp")


def _owner(staging: Path) -> int | None:
    try:
        return int((staging / MARKER).read_text().strip())
    except (OSError, ValueError):
        return None


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


_interrupted = False


def watch_signals() -> None:
    """SIGTERM exits through the staging context (which removes DIR.tmp), and every Ctrl-C is remembered: a
    KeyboardInterrupt raised inside a __del__ is ignored by Python (seen under load: regex's Group.__del__ during the
    export), so a run that was interrupted must be stopped and never renamed to DIR/."""
    import signal

    def interrupt(signum, frame):
        global _interrupted
        _interrupted = True
        signal.default_int_handler(signum, frame)

    def terminate(signum, frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGINT, interrupt)
    signal.signal(signal.SIGTERM, terminate)
    default_hook = sys.unraisablehook

    def quiet(unraisable):  # a Ctrl-C that landed in a __del__: the flag has it, no traceback for the user
        if not isinstance(unraisable.exc_value, KeyboardInterrupt):
            default_hook(unraisable)

    sys.unraisablehook = quiet


def raise_if_interrupted() -> None:
    """Called between stages, so a swallowed Ctrl-C stops the run at the next stage rather than at the very end."""
    if _interrupted:
        raise KeyboardInterrupt


def usual_modes(folder: Path) -> None:
    """Give every file and folder under `folder` the mode a plain open()/mkdir gets under the current umask (0644 and
    0755 under the usual 022): some writers create private files (safetensors saves through a 0600 temporary file),
    which another account (a serving user, a container run with --user) could not read."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(folder, 0o777 & ~mask)
    for path in folder.rglob("*"):
        if not path.is_symlink():
            os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~mask)


class Staging:
    """Context manager: yields DIR.tmp; on success `commit()` renames it to DIR; on any exit without commit, removes it."""

    def __init__(self, out: Path, overwrite: bool):
        self.out, self.overwrite = Path(out), overwrite
        self.path = staging_path(self.out)
        self.stale_removed = False
        self.committed = False

    def __enter__(self) -> "Staging":
        check_destination(self.out, self.overwrite)
        if self.path.exists():
            shutil.rmtree(self.path)
            self.stale_removed = True
        self.path.mkdir(parents=True)
        (self.path / MARKER).write_text(str(os.getpid()))
        return self

    def commit(self) -> None:
        raise_if_interrupted()  # a Ctrl-C swallowed on the way: the exit path removes DIR.tmp
        (self.path / MARKER).unlink()
        usual_modes(self.path)
        if self.out.exists():
            if not self.overwrite:
                raise UserError(f"output directory {self.out} appeared while running; the result is kept in {self.path}")
            shutil.rmtree(self.out)
        os.replace(self.path, self.out)
        self.committed = True

    def __exit__(self, exc_type, exc, tb) -> None:
        if not self.committed and self.path.exists():
            shutil.rmtree(self.path, ignore_errors=True)
