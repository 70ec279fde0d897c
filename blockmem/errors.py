"""Errors a user can act on: each names the problem and, where there is one, the fix.

The CLI prints these as one line without a traceback; anything else is a bug.
"""

from __future__ import annotations


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
