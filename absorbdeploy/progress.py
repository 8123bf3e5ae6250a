"""What the user sees while a run works, and the per-stage clock the report keeps.

On a terminal: one line per stage plus a `block i/N` bar (rich). Elsewhere (CI logs): plain lines, one per stage and a
few per block pass, no bars. Progress and results go to stdout; stderr is kept for the one-line error or failed gate, so
a pipeline can capture it. Each stage records wall time and the peak resident memory seen while it ran (and peak CUDA
memory where there is a GPU).
"""

import sys
import threading
import time
from contextlib import contextmanager

from rich.console import Console

from absorbdeploy.atomic import raise_if_interrupted


class _PeakRSS:
    """Samples this process's resident set size every 50 ms on a daemon thread; `peak` is the largest value seen."""

    def __init__(self):
        import psutil

        self._process = psutil.Process()
        self.peak = self._process.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            self.peak = max(self.peak, self._process.memory_info().rss)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return max(self.peak, self._process.memory_info().rss)


class Progress:
    def __init__(self, total_stages: int, quiet: bool = False, console: Console | None = None):
        self.console = console or _console()
        self.interactive = self.console.is_terminal and not quiet
        self.quiet = quiet
        self.total = total_stages
        self.index = 0
        self.stages: dict[str, dict] = {}
        self._bar = None
        self._label = ""

    def log(self, message: str) -> None:
        if not self.quiet:
            self.console.print(message, markup=False, soft_wrap=True)

    @contextmanager
    def stage(self, name: str, detail: str = ""):
        raise_if_interrupted()
        self.index += 1
        prefix = f"[{self.index}/{self.total}] {name:<10}"
        self.log(f"{prefix} {detail}".rstrip())
        sampler = _PeakRSS()
        cuda = _cuda_reset()
        start = time.perf_counter()
        try:
            yield self
        finally:
            seconds = time.perf_counter() - start
            self._end_bar()
            record = {"seconds": round(seconds, 3), "peak_rss_mb": round(sampler.stop() / 2**20, 1)}
            if cuda:
                record["peak_cuda_mb"] = round(cuda.max_memory_allocated() / 2**20, 1)
            self.stages[name] = record
            self.log(f"{' ' * len(prefix)} done in {seconds:.1f} s")

    def blocks(self, label: str):
        """Returns self; call `advance(done, total)` after each block."""
        self._label = label
        return self

    def advance(self, done: int, total: int) -> None:
        if self.quiet:
            return
        if self.interactive:
            if self._bar is None:
                from rich.progress import BarColumn, MofNCompleteColumn, Progress as Bar, TextColumn, TimeElapsedColumn

                self._bar = Bar(TextColumn(f"    {self._label}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                                console=self.console, transient=True)
                self._bar.start()
                self._task = self._bar.add_task(self._label, total=total)
            self._bar.update(self._task, completed=done)
            if done == total:
                self._end_bar()
        elif done == total or done % max(1, total // 4) == 0:
            self.log(f"    {self._label}: block {done}/{total}")

    def _end_bar(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None


def _console() -> Console:
    probe = Console()
    return Console(highlight=False, width=None if probe.is_terminal else 140)


def _cuda_reset():
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda
    return None
