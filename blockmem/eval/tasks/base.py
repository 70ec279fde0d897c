"""What every task generator returns, and the search that sizes a prompt in the model's tokens.

A `Sample` is one prompt split in two: the `context` (instructions and haystack; what a KV-cache
compressor such as kvpress may compress) and the `question` (the query and the start of the
answer, fed after the context). Every system in a comparison gets the same token ids:
`tokenizer.encode(context) + tokenizer.encode(question, special=False)`.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from blockmem.errors import ConfigError
from blockmem.eval.metrics import score
from blockmem.model.tokenizer import Tokenizer

DEFAULT_DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)


@dataclass(frozen=True)
class Sample:
    task: str
    length: int  # the target: prompt tokens + max_new_tokens <= length
    index: int
    context: str
    question: str
    references: tuple[str, ...]
    metric: str  # see blockmem.eval.metrics
    max_new_tokens: int
    depth: float | None = None  # where the (first) needle sits, 0 = start of the haystack, 1 = end
    stop: tuple[str, ...] = ()  # generation stops at these strings (only passkey: models often answer after a newline)
    tokens: int = 0  # prompt tokens, context + question

    def prompt_ids(self, tokenizer: Tokenizer) -> tuple[list[int], list[int]]:
        """(context ids, question ids); their concatenation is the prompt every system reads."""
        return tokenizer.encode(self.context), tokenizer.encode(self.question, special=False)

    def score(self, prediction: str) -> float:
        return score(self.metric, prediction, self.references)


@dataclass(frozen=True)
class TaskOptions:
    """Inputs some tasks need beyond (tokenizer, length, index, seed)."""

    depths: Sequence[float] = DEFAULT_DEPTHS
    squad: str | None = None  # SQuAD v1/v2 JSON file (qa_squad)
    hotpot: str | None = None  # HotpotQA JSON file (qa_hotpot)

    def depth(self, index: int) -> float:
        """Depths cycle with the sample index, so N samples cover each depth N/len(depths) times."""
        return float(self.depths[index % len(self.depths)])


def rng_for(task: str, seed: int, length: int, index: int) -> random.Random:
    """Every sample is determined by (task, seed, length, index)."""
    return random.Random(f"{task}-{seed}-{length}-{index}")


def fit(tokenizer: Tokenizer, budget: int, render: Callable[[int], tuple[str, str]], estimate: int,
        what: str, most: int) -> tuple[int, str, str, int]:
    """The largest n <= `most` whose rendered (context, question) has at most `budget` tokens.

    `render(n)` builds the prompt with n haystack units; token counts grow with n. Starts from
    `estimate`, brackets, then bisects: a handful of encodes per sample. When even `most` units
    fit (a haystack source too small for the length), the prompt comes out short.
    """
    cache: dict[int, tuple[str, str, int]] = {}

    def tokens(n: int) -> int:
        if n not in cache:
            context, question = render(n)
            cache[n] = (context, question, len(tokenizer.encode(context)) + len(tokenizer.encode(question,
                                                                                                  special=False)))
        return cache[n][2]

    if tokens(0) > budget:
        raise ConfigError(f"{what}: the prompt without any haystack already has {tokens(0)} tokens, more than "
                          f"the {budget} available", "ask for a longer length")
    low, high = 0, min(most, max(1, estimate))
    while tokens(high) <= budget:  # grow until past the budget
        if high == most:
            return high, *cache[high]
        low, high = high, min(most, high * 2)
    guess = max(1, estimate * 9 // 10)
    if low < guess < high and tokens(guess) <= budget:
        low = guess
    while high - low > 1:
        middle = (low + high) // 2
        if tokens(middle) <= budget:
            low = middle
        else:
            high = middle
    tokens(low)
    return low, *cache[low]


def per_unit(tokenizer: Tokenizer, units: Sequence[str]) -> float:
    """Average tokens per unit of a haystack (from a sample of units)."""
    sample = list(units[:200])
    return max(1.0, len(tokenizer.encode("".join(sample), special=False)) / max(1, len(sample)))


def insert_at_depths(units: Sequence[str], needles: Sequence[tuple[float, str]]) -> str:
    """The units joined, with each (depth, text) needle put between units at that depth."""
    out = list(units)
    for depth, text in sorted(needles, key=lambda item: item[0], reverse=True):
        out.insert(round(len(units) * min(max(depth, 0.0), 1.0)), text)
    return "".join(out)
