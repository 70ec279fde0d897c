"""Giving freed heap memory back to the OS, for code that promised to bound RSS.

glibc raises its mmap threshold as large blocks are freed, after which activations of up to 32 MB
come from the heap and stay resident once freed (~70 MiB per SmolLM2 layer of a 1,024-token
prefill chunk, ~200 MB over a 16K prefill). `malloc_trim` returns them. Where a RAM budget is set
it is called after each prefill chunk and each decode step (0.1-2 ms at decode, ~10 ms with a
prefill's heap), and once after a model is loaded. Trimming after every layer's attention as well
cut the peak by another ~50 MiB but cost 16% of prefill, so it is not done.
"""

from __future__ import annotations

import sys
from typing import Any

_LIBC: Any = None


def trim_heap() -> None:
    """Hand freed heap memory back to the OS (glibc `malloc_trim`; a no-op elsewhere)."""
    global _LIBC
    if _LIBC is None:
        _LIBC = False
        if sys.platform.startswith("linux"):
            import ctypes

            try:
                _LIBC = ctypes.CDLL("libc.so.6")
                _LIBC.malloc_trim
            except (OSError, AttributeError):
                _LIBC = False
    if _LIBC:
        _LIBC.malloc_trim(0)
