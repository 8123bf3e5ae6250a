"""What a run shows and records per stage: numbered stage lines, block progress at quarters in logs, nothing when quiet,
and each stage's wall time and peak resident memory, also when the stage fails."""

import io
import time

import pytest
from rich.console import Console

from absorbdeploy.progress import Progress


def _plain(quiet: bool = False):
    buffer = io.StringIO()
    return Progress(3, quiet=quiet, console=Console(file=buffer, force_terminal=False, width=200)), buffer


class _Clock:
    """A perf_counter that returns the given readings in turn; `spans()` are the differences of consecutive pairs
    (start, end), what a stage that read the clock at its start and end must record."""

    def __init__(self, *readings):
        self.readings, self.given = list(readings), list(readings)

    def perf_counter(self):
        return self.readings.pop(0)

    def spans(self) -> list[float]:
        return [end - start for start, end in zip(self.given[::2], self.given[1::2])]


def test_stages_are_numbered_logged_and_timed(monkeypatch):
    import absorbdeploy.progress

    clock = _Clock(10.0, 12.5, 20.0, 20.25)
    monkeypatch.setattr(absorbdeploy.progress, "time", clock)
    progress, out = _plain()
    with progress.stage("load", "builtin:tiny-llama"):
        pass
    with progress.stage("data"):
        pass
    lines = out.getvalue().splitlines()
    assert lines[0] == "[1/3] load       builtin:tiny-llama" and lines[2] == "[2/3] data"
    assert lines[1].strip().startswith("done in") and lines[1].strip().endswith(" s")
    assert list(progress.stages) == ["load", "data"]
    assert [stage["seconds"] for stage in progress.stages.values()] == clock.spans()  # the fake clock's, not real time
    assert progress.stages["load"]["peak_rss_mb"] > 10  # a Python process with rich and psutil loaded


def test_peak_memory_catches_an_allocation_released_before_the_stage_ends():
    progress, _ = _plain()
    with progress.stage("before"):
        pass
    with progress.stage("allocate"):
        block = b"\x01" * (300 * 2**20)  # 300 MiB, touched
        time.sleep(0.5)  # several 50 ms samples while it is held
        del block
    assert progress.stages["allocate"]["peak_rss_mb"] >= progress.stages["before"]["peak_rss_mb"] + 250


def test_block_progress_is_logged_at_quarters_without_a_terminal():
    progress, out = _plain()
    bar = progress.blocks("dense pass")
    for done in range(1, 9):
        bar.advance(done, 8)
    assert out.getvalue().splitlines() == [f"    dense pass: block {k}/8" for k in (2, 4, 6, 8)]


def test_quiet_prints_nothing_but_still_records():
    progress, out = _plain(quiet=True)
    with progress.stage("prune"):
        progress.blocks("prune").advance(1, 1)
        progress.log("hidden")
    assert out.getvalue() == "" and set(progress.stages) == {"prune"}


def test_a_failing_stage_is_recorded_and_the_error_propagates(monkeypatch):
    import absorbdeploy.progress

    clock = _Clock(3.0, 4.0)
    monkeypatch.setattr(absorbdeploy.progress, "time", clock)
    progress, _ = _plain()
    with pytest.raises(ValueError, match="boom"):
        with progress.stage("export"):
            raise ValueError("boom")
    assert [progress.stages["export"]["seconds"]] == clock.spans() and progress.index == 1


def test_on_a_terminal_the_bar_is_shown_and_closed_when_done():
    buffer = io.StringIO()
    progress = Progress(1, console=Console(file=buffer, force_terminal=True, width=100))
    assert progress.interactive
    bar = progress.blocks("prune")
    bar.advance(1, 2)
    assert progress._bar is not None
    bar.advance(2, 2)
    assert progress._bar is None and "prune" in buffer.getvalue()
