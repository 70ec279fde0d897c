"""Scoring a prediction against its references, as RULER scores its tasks.

Both metrics compare case-insensitively after control characters (newlines, tabs, NUL...) in the
prediction are replaced by spaces and the ends stripped:

- `all`  (string_match_all): the share of references contained in the prediction; 1.0 only when
  every reference is there. RULER uses it for the needle, variable-tracking and word tasks.
- `part` (string_match_part): 1.0 when any reference is contained. RULER uses it for QA, whose
  references are alternative phrasings of one answer.
- `first_number`: the classic passkey score: 1.0 when the first number in the prediction is the
  (single) reference.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from blockmem.errors import ConfigError

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
METRICS = ("all", "part", "first_number")


def clean(prediction: str) -> str:
    """The prediction with control characters turned into spaces and the ends stripped."""
    return _CONTROL.sub(" ", prediction).strip()


def string_match_all(prediction: str, references: Sequence[str]) -> float:
    text = clean(prediction).lower()
    return sum(ref.lower() in text for ref in references) / len(references) if references else 0.0


def string_match_part(prediction: str, references: Sequence[str]) -> float:
    text = clean(prediction).lower()
    return float(any(ref.lower() in text for ref in references))


def first_number(prediction: str, references: Sequence[str]) -> float:
    found = re.search(r"\d+", clean(prediction))
    return float(found is not None and found.group() in references)


def score(metric: str, prediction: str, references: Sequence[str]) -> float:
    if metric == "all":
        return string_match_all(prediction, references)
    if metric == "part":
        return string_match_part(prediction, references)
    if metric == "first_number":
        return first_number(prediction, references)
    raise ConfigError(f"unknown metric {metric!r}", f"use one of: {', '.join(METRICS)}")
