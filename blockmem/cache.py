"""Where blockmem keeps files it can rebuild: $BLOCKMEM_CACHE, else $XDG_CACHE_HOME/blockmem,
else ~/.cache/blockmem. Every entry is keyed by a hash of what it was built from and written
atomically, so a damaged or stale entry is rebuilt, never trusted."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir(kind: str) -> Path:
    """The folder for one kind of entry (e.g. "tokenizers", "kernels"); not created here."""
    base = os.environ.get("BLOCKMEM_CACHE") or os.path.join(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"),
                                                            "blockmem")
    return Path(base) / kind
