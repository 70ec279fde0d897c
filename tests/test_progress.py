"""Progress on stderr: a rich bar in a terminal, plain lines in a log (blockmem.progress)."""

from __future__ import annotations

import io

from rich.console import Console
from rich.progress import Progress

from blockmem.progress import LineProgress, progress_bar


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _log() -> tuple[Console, io.StringIO]:
    text = io.StringIO()
    return Console(file=text, width=200), text


def test_terminal_gets_a_bar_and_a_log_gets_lines() -> None:
    console, _ = _log()
    assert isinstance(progress_bar(console, "samples"), LineProgress)
    assert isinstance(progress_bar(Console(file=io.StringIO(), force_terminal=True), "samples"), Progress)


def test_lines_on_rename_and_interval_with_time_left_from_this_runs_pace() -> None:
    console, text = _log()
    clock = Clock()
    progress = LineProgress(console, "samples", interval=30, clock=clock)
    with progress:
        bar = progress.add_task("eval", total=10)
        progress.update(bar, completed=4)  # a resumed run: 4 samples were in the file already
        clock.now += 1
        progress.update(bar, description="dense @ 4K")  # a new group is always logged
        for _ in range(3):
            clock.now += 10
            progress.advance(bar)  # quiet until 30 s have passed since the last line
        clock.now += 5
        progress.advance(bar)
    lines = text.getvalue().splitlines()
    # 3 samples in the 31 s since the run's first count: 10 s a sample, 3 left
    assert lines == ["dense @ 4K: 4/10 samples (40%), 0m01s elapsed",
                     "dense @ 4K: 7/10 samples (70%), 0m31s elapsed, ~0m31s left",
                     "dense @ 4K: 8/10 samples (80%), 0m36s elapsed, ~0m18s left"]


def test_transient_work_leaves_no_closing_line_and_unknown_totals_count() -> None:
    console, text = _log()
    clock = Clock()
    with LineProgress(console, "tokens", transient=True, interval=30, clock=clock) as progress:
        bar = progress.add_task("prefill")
        progress.update(bar, completed=1024, total=None)
        clock.now += 3700
        progress.update(bar, completed=2048, total=None)
    assert text.getvalue().splitlines() == ["prefill: 2048 tokens, 1h01m elapsed"]
