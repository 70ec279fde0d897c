"""The RULER synthetic tasks (Hsieh et al., 2024), written from their published definitions.

Needle in a haystack (all scored with `all`: every expected value must be in the answer):

| task | haystack | keys | values | needles |
|---|---|---|---|---|
| niah_single_1 | noise (repeated filler) | words | 7-digit numbers | 1 |
| niah_single_2 | essay (natural prose) | words | numbers | 1 |
| niah_single_3 | essay | words | UUIDs | 1 |
| niah_multikey_1 | essay | words | numbers | 4 keys, one asked |
| niah_multikey_2 | needles (the haystack is distractor needles) | words | numbers | 1 asked |
| niah_multikey_3 | needles | UUIDs | UUIDs | 1 asked |
| niah_multivalue | essay | words | numbers | 1 key with 4 values, all asked |
| niah_multiquery | essay | words | numbers | 4 keys, all asked |

Aggregation: `vt` (variable tracking: a chain of 4 hops `VAR B = VAR A` from one value, in noise;
name every variable holding the value), `cwe` (common words: 10 words appear 30 times and many
others 3 times in a numbered list; name the 10), `fwe` (frequent words: coded words drawn from a
Zipf distribution with alpha 2; name the 3 most frequent). QA (`qa_squad`, `qa_hotpot`, scored
with `part`) is in blockmem.eval.tasks.qa. The essay haystack is the King James Bible (see
blockmem.eval.text); the prompts are our own wording of RULER's templates.

The queried needle sits at the sample's depth; other needles at random depths. RULER generates up
to 128 tokens for every needle task; we give each the room its values need (32 tokens for one
number, 72 for a UUID, 80 for four numbers), which matters on a CPU.
"""

from __future__ import annotations

import random
import string
import uuid
from collections import Counter
from dataclasses import dataclass

from blockmem.eval.tasks.base import Sample, TaskOptions, fit, insert_at_depths, per_unit, rng_for
from blockmem.eval.text import NOISE, prose_verses, word_pool
from blockmem.model.tokenizer import Tokenizer


@dataclass(frozen=True)
class Niah:
    haystack: str  # noise | essay | needles
    keys: str = "words"  # words | uuids
    values: str = "numbers"  # numbers | uuids
    num_keys: int = 1  # needles with different keys (one of them asked, unless num_queries > 1)
    num_values: int = 1  # values per key
    num_queries: int = 1  # keys asked at once


NIAH = {
    "niah_single_1": Niah("noise"),
    "niah_single_2": Niah("essay"),
    "niah_single_3": Niah("essay", values="uuids"),
    "niah_multikey_1": Niah("essay", num_keys=4),
    "niah_multikey_2": Niah("needles"),
    "niah_multikey_3": Niah("needles", keys="uuids", values="uuids"),
    "niah_multivalue": Niah("essay", num_values=4),
    "niah_multiquery": Niah("essay", num_keys=4, num_queries=4),
}


def _key(rng: random.Random, kind: str) -> str:
    if kind == "uuids":
        return str(uuid.UUID(int=rng.getrandbits(128), version=4))
    pool = word_pool()
    return f"{rng.choice(pool)}-{rng.choice(pool)}"


def _value(rng: random.Random, kind: str) -> str:
    return str(uuid.UUID(int=rng.getrandbits(128), version=4)) if kind == "uuids" else str(rng.randint(10**6, 10**7 - 1))


NEEDLE_START = "One of the special magic"  # every needle sentence begins so (the selection probe finds them by it)


def _needle(noun: str, key: str, value: str) -> str:
    return f"{NEEDLE_START} {noun} for {key} is: {value}. "


def _noise(tokenizer: Tokenizer, budget: int) -> list[str]:
    """Enough filler sentences for `budget` tokens (with room: `fit` takes what it needs)."""
    return [NOISE] * (budget * 3 // (2 * len(tokenizer.encode(NOISE, special=False))) + 16)


def _essay_units(rng: random.Random, count: int) -> list[str]:
    verses = prose_verses()
    start = rng.randrange(len(verses))
    return [verses[(start + i) % len(verses)] + " " for i in range(count)]


def niah(name: str, tokenizer: Tokenizer, length: int, index: int, seed: int, options: TaskOptions,
         max_new_tokens: int | None = None) -> Sample:
    spec = NIAH[name]
    rng = rng_for(name, seed, length, index)
    depth = options.depth(index)
    noun = "uuids" if spec.values == "uuids" else "numbers"
    keys: list[str] = []
    while len(keys) < spec.num_keys:
        key = _key(rng, spec.keys)
        if key not in keys:
            keys.append(key)
    values = {key: [_value(rng, spec.values) for _ in range(spec.num_values)] for key in keys}
    asked = keys[:spec.num_queries]
    needles = [(depth if i == 0 and j == 0 else rng.random(), _needle(noun, key, value))
               for i, key in enumerate(keys) for j, value in enumerate(values[key])]
    budget = length - (max_new_tokens or _niah_output(spec))
    if spec.haystack == "noise":
        pool = _noise(tokenizer, budget)
    elif spec.haystack == "essay":
        pool = _essay_units(rng, budget // 8 + 16)  # verses have > 8 tokens
    else:  # distractor needles with other keys and values
        pool = []
        while len(pool) * 12 < budget + 200:
            key = _key(rng, spec.keys)
            if key not in keys:
                pool.append(_needle(noun, key, _value(rng, spec.values)))
    asked_text = ", ".join(asked[:-1]) + (" and " if len(asked) > 1 else "") + asked[-1]
    intro = (f"Some special magic {noun} are hidden inside the following text. Make sure to memorize them; "
             f"you will be asked about the {noun} afterwards.\n")
    question = (f"\nWhat are all the special magic {noun} for {asked_text} mentioned in the text above? "
                f"The special magic {noun} for {asked_text} mentioned in the text above are")

    def render(n: int) -> tuple[str, str]:
        return intro + insert_at_depths(pool[:n], needles), question

    n, context, question, tokens = fit(tokenizer, budget, render, int(budget / per_unit(tokenizer, pool)), name,
                                 len(pool))
    references = tuple(value for key in asked for value in values[key])
    return Sample(name, length, index, context, question, references, "all", length - budget, depth, (), tokens)


def _niah_output(spec: Niah) -> int:
    """Tokens to generate: room for every asked value (a UUID is ~25 tokens) plus some preamble."""
    per_value = 28 if spec.values == "uuids" else 8
    return max(32, 16 + 2 * per_value * spec.num_values * spec.num_queries)


def vt(tokenizer: Tokenizer, length: int, index: int, seed: int, options: TaskOptions,
       max_new_tokens: int = 30, hops: int = 4) -> Sample:
    """Variable tracking: one chain VAR A = value, VAR B = VAR A, ... hidden in noise."""
    rng = rng_for("vt", seed, length, index)
    names: list[str] = []
    while len(names) < hops + 1:
        name = "".join(rng.choice(string.ascii_uppercase) for _ in range(5))
        if name not in names:
            names.append(name)
    value = str(rng.randint(10000, 99999))
    statements = [f"VAR {names[0]} = {value}. "] + [f"VAR {names[i]} = VAR {names[i - 1]}. " for i in range(1, hops + 1)]
    depths = sorted(rng.random() for _ in statements)  # in order: each hop after the one it names
    needles = list(zip(depths, statements))
    budget = length - max_new_tokens
    pool = _noise(tokenizer, budget)
    intro = "Memorize and track the chain of variable assignments hidden in the following text.\n\n"
    question = (f"\nQuestion: Find every variable that is assigned the value {value}, directly or through other "
                f"variables, in the text above. Answer: Following the chain of assignments in the text above, "
                f"{hops + 1} variables are assigned the value {value}, they are:")

    def render(n: int) -> tuple[str, str]:
        return intro + insert_at_depths(pool[:n], needles), question

    _, context, question, tokens = fit(tokenizer, budget, render, int(budget / per_unit(tokenizer, pool)), "vt",
                                         len(pool))
    return Sample("vt", length, index, context, question, tuple(names), "all", max_new_tokens, None, (), tokens)


def cwe(tokenizer: Tokenizer, length: int, index: int, seed: int, options: TaskOptions,
        max_new_tokens: int = 80, num_common: int = 10, freq_common: int = 30, freq_rare: int = 3) -> Sample:
    """Common words extraction: a numbered list where `num_common` words repeat `freq_common` times
    and the rest `freq_rare` times. At lengths too short for 10 x 30 words the common frequency
    drops (as in RULER) but stays above the rare one."""
    rng = rng_for("cwe", seed, length, index)
    pool = list(word_pool())
    budget = length - max_new_tokens
    intro = "Below is a numbered list of words. Some of them appear many times.\n"
    question = (f"\nQuestion: What are the {num_common} most common words in the list above? Answer: The "
                f"{num_common} most common words in the list above are:")
    while True:
        words = rng.sample(pool, min(len(pool), num_common + budget // (2 * freq_rare)))
        common, rare = words[:num_common], words[num_common:]

        def render(n: int, freq: int = freq_common) -> tuple[str, str]:
            items = common * freq + rare[:n] * freq_rare
            random.Random(f"{seed}-{index}-{n}").shuffle(items)
            return intro + "".join(f"{i + 1}. {w}\n" for i, w in enumerate(items)), question

        if len(tokenizer.encode(render(0)[0])) < budget * 0.8 or freq_common <= freq_rare + 1:
            break
        freq_common = max(freq_rare + 1, freq_common * 2 // 3)
    estimate = int((budget - len(tokenizer.encode(render(0)[0]))) / (per_unit(tokenizer, [f"{i}. {w}\n" for i, w in
                                                                                         enumerate(rare, 100)]) * freq_rare))
    _, context, question, tokens = fit(tokenizer, budget, render, max(1, estimate), "cwe", len(rare))
    return Sample("cwe", length, index, context, question, tuple(common), "all", max_new_tokens, None, (), tokens)


def fwe(tokenizer: Tokenizer, length: int, index: int, seed: int, options: TaskOptions,
        max_new_tokens: int = 50, alpha: float = 2.0, vocabulary: int = 1000) -> Sample:
    """Frequent words extraction: coded words drawn i.i.d. from a Zipf(alpha) distribution over a
    random vocabulary; the answer is the three most frequent (the draw is repeated if ranks 3 and
    4 tie)."""
    budget = length - max_new_tokens
    intro = "Read the following coded text and keep count of how often each coded word appears.\n"
    question = ("\nQuestion: Ignore the dots '....'. What are the three most frequently appearing coded words in "
                "the text above? Answer: The three most frequently appearing coded words in the text above are:")
    for attempt in range(20):
        rng = rng_for("fwe", seed, length, index * 1000 + attempt)
        codes: list[str] = []
        seen: set[str] = set()
        while len(codes) < vocabulary:
            code = "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(3, 6)))
            if code not in seen:
                seen.add(code)
                codes.append(code)
        weights = [1 / (rank + 1) ** alpha for rank in range(vocabulary)]
        stream = rng.choices(codes, weights, k=budget)

        def render(n: int) -> tuple[str, str]:
            words = stream[:n]
            return intro + " ".join(w if (i + 1) % 20 else w + " ...." for i, w in enumerate(words)) + "\n", question

        n, context, question, tokens = fit(tokenizer, budget, render, budget // 3, "fwe", len(stream))
        ranked = Counter(stream[:n]).most_common(4)
        if len(ranked) < 4 or ranked[2][1] > ranked[3][1]:
            return Sample("fwe", length, index, context, question, tuple(w for w, _ in ranked[:3]), "all",
                          max_new_tokens, None, (), tokens)
    raise AssertionError("fwe: no draw without a tie in 20 attempts")
