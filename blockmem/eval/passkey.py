"""Passkey retrieval: a random 5-digit key hidden at a chosen depth in filler text.

The classic task of Landmark Attention and InfLLM: repeated filler sentences, one sentence with
the key, then a question. Prompts are sized in tokens of the model's own tokenizer, and every
trial is determined by (seed, length, trial index), so runs are reproducible and resumable.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

from blockmem.model.tokenizer import Tokenizer

INTRO = ("There is an important piece of information hidden inside a lot of irrelevant text. Find it and "
         "memorize it. I will quiz you about the important information there.\n\n")
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
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
        found = re.search(r"\d+", answer)
        return found is not None and found.group() == self.key


def make_trial(tokenizer: Tokenizer, length: int, index: int, seed: int = 0) -> Trial:
    rng = random.Random(f"passkey-{seed}-{length}-{index}")
    key = str(rng.randint(10000, 99999))
    depth = rng.random()
    fixed = len(tokenizer.encode(INTRO + NEEDLE.format(key=key) + QUESTION))
    per_filler = len(tokenizer.encode(FILLER * 20, special=False)) / 20
    count = max(0, int((length - fixed) / per_filler))
    while count and len(tokenizer.encode(_prompt(key, depth, count))) > length:
        count -= 1
    prompt = _prompt(key, depth, count)
    return Trial(length, index, key, depth, prompt, len(tokenizer.encode(prompt)))


def _prompt(key: str, depth: float, fillers: int) -> str:
    before = round(fillers * depth)
    return INTRO + FILLER * before + NEEDLE.format(key=key) + FILLER * (fillers - before) + QUESTION


def parse_length(text: str) -> int:
    """'4k' -> 4096, '32K' -> 32768, '1000' -> 1000."""
    text = text.strip().lower()
    return int(float(text[:-1]) * 1024) if text.endswith("k") else int(text)
