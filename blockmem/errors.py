"""Errors a user can act on: each names the problem and, where there is one, the fix.

The CLI and the scripts in benchmarks/ print these as `explain` says, without a traceback; anything
else is a bug.
"""

from __future__ import annotations

import sys
from collections.abc import Callable


class BlockmemError(Exception):
    """Base class: `problem` says what went wrong, `fix` what to do about it."""

    def __init__(self, problem: str, fix: str | None = None) -> None:
        self.problem = problem
        self.fix = fix
        super().__init__(str(self))

    def __str__(self) -> str:
        return self.problem if not self.fix else f"{self.problem} ({self.fix})"


class ModelError(BlockmemError):
    """A model file or directory is missing, unreadable, corrupt or unsupported."""


class ConfigError(BlockmemError):
    """An option or a combination of options is invalid."""


class ContextLengthError(BlockmemError):
    """The input does not fit the context the chosen attention method can serve."""


class MemoryFileError(BlockmemError):
    """A saved memory is missing, corrupt, incomplete, or does not match the model or settings."""


def explain(exc: BlockmemError | KeyboardInterrupt) -> tuple[list[str], int]:
    """What the CLI and the scripts print on stderr for an error a user can act on, and the exit
    status: "error: PROBLEM" and "  fix: FIX" with 2 for a BlockmemError, "interrupted" with 130
    for Ctrl-C."""
    if isinstance(exc, KeyboardInterrupt):
        return ["interrupted"], 130
    return [f"error: {exc.problem}"] + ([f"  fix: {exc.fix}"] if exc.fix else []), 2


def run_script(main: Callable[[], object]) -> None:
    """Run a script's `main` as the CLI runs a command: a BlockmemError or Ctrl-C prints what
    `explain` says, without a traceback, and exits with its status. The scripts in benchmarks/ end
    with `run_script(main)`."""
    try:
        main()
    except (BlockmemError, KeyboardInterrupt) as exc:
        lines, status = explain(exc)
        print("\n".join(lines), file=sys.stderr)
        raise SystemExit(status) from None
