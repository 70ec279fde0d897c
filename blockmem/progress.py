"""Progress on stderr for long work: a live bar in a terminal, plain lines in a log.

rich draws nothing while stderr is a file or a pipe (`blockmem eval ... 2> eval.log`, nohup, CI),
so an hours-long run would log nothing until it ends. `progress_bar` gives a rich bar in a
terminal and a `LineProgress` elsewhere: one line when the work's description changes and at
most one every `interval` seconds otherwise, with the count, elapsed time and time left.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

LOG_INTERVAL_S = 30.0


def progress_bar(console: Console, unit: str, *, transient: bool = False,
                 interval: float = LOG_INTERVAL_S) -> Progress | LineProgress:
    """A progress display on `console` counting `unit` (e.g. "tokens", "samples"). `transient`: in a
    terminal the bar vanishes when done, in a log no closing line is written."""
    if console.is_terminal:
        return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TextColumn(unit), TimeElapsedColumn(), TimeRemainingColumn(),
                        console=console, transient=transient)
    return LineProgress(console, unit, transient=transient, interval=interval)


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"


@dataclass
class _Task:
    description: str
    total: float | None
    start: float
    last: float  # when a line was last written (or the task began)
    completed: float = 0
    base: tuple[float, float] | None = None  # (count, time) this run's pace is measured from
    printed: tuple[str, float] | None = None  # (description, count) of the last line


class LineProgress:
    """The part of rich's Progress that blockmem uses (add_task, update, advance, with-block),
    written as lines such as `dense @ 4K: 120/352 samples (34%), 40m12s elapsed, ~1h17m left`.
    Time left comes from the pace of this run only: work already done when it started (a resumed
    eval) does not count as fast progress."""

    def __init__(self, console: Console, unit: str, *, transient: bool = False,
                 interval: float = LOG_INTERVAL_S, clock: Callable[[], float] = time.monotonic) -> None:
        self.console, self.unit, self.transient, self.interval, self.clock = console, unit, transient, interval, clock
        self.tasks: list[_Task] = []

    def __enter__(self) -> LineProgress:
        return self

    def __exit__(self, kind: object, error: object, trace: object) -> None:
        if kind is None and not self.transient:
            for task in self.tasks:
                if task.printed != (task.description, task.completed):
                    self._print(task)

    def add_task(self, description: str, total: float | None = None, **_: Any) -> int:
        now = self.clock()
        self.tasks.append(_Task(description, total, start=now, last=now))
        return len(self.tasks) - 1

    def advance(self, task_id: int, advance: float = 1) -> None:
        self.update(task_id, advance=advance)

    def update(self, task_id: int, *, total: float | None = None, completed: float | None = None,
               advance: float | None = None, description: str | None = None, **_: Any) -> None:
        task = self.tasks[task_id]
        now = self.clock()
        if task.base is None:
            # pace counts from the first count set (what a resumed run had done before is not
            # pace), or from the start when the count only advances
            if completed is not None:
                task.base = (completed, now)
            elif advance is not None:
                task.base = (task.completed, task.start)
        if total is not None:
            task.total = total
        if completed is not None:
            task.completed = completed
        if advance is not None:
            task.completed += advance
        renamed = description is not None and description != task.description
        if description is not None:
            task.description = description
        if renamed or now - task.last >= self.interval:
            self._print(task)

    def _print(self, task: _Task) -> None:
        now = self.clock()
        task.last, task.printed = now, (task.description, task.completed)
        done, total = task.completed, task.total
        line = f"{task.description}: {done:g}"
        if total:
            line += f"/{total:g} {self.unit} ({100 * done / total:.0f}%)"
        else:
            line += f" {self.unit}"
        line += f", {_duration(now - task.start)} elapsed"
        if total and task.base is not None:
            base_done, base_time = task.base
            rate = (done - base_done) / max(now - base_time, 1e-9)
            if rate > 0 and done < total:
                line += f", ~{_duration((total - done) / rate)} left"
        self.console.print(line, highlight=False, soft_wrap=True)  # the description is markup, as in rich
