"""Long-text perplexity by position: does more context lower the loss?

The text is the King James Bible (blockmem.eval.text), consecutive verses from a start chosen by
(seed, index); the first `length` tokens are scored. Each token's loss is grouped into a bucket
by its position, with bucket edges at powers of two from 256: [0, 256), [256, 512), [512, 1K),
... A method that uses far context well keeps the loss falling in the later buckets; one that
forgets (or a dense model past its trained window) shows it rising.
"""

from __future__ import annotations

import math

from blockmem.eval.tasks.base import rng_for
from blockmem.eval.text import prose_verses
from blockmem.model.tokenizer import Tokenizer


def text_ids(tokenizer: Tokenizer, length: int, index: int, seed: int) -> list[int]:
    """`length` tokens of consecutive verses (BOS included when the tokenizer adds one)."""
    verses = prose_verses()
    rng = rng_for("perplexity", seed, length, index)
    start = rng.randrange(len(verses))
    count = length // 16 + 64  # verses average > 16 tokens; more are added if not
    while True:
        ids = tokenizer.encode(" ".join(verses[(start + i) % len(verses)] for i in range(count)))
        if len(ids) >= length:
            return ids[:length]
        count *= 2


def bucket_edges(length: int) -> list[int]:
    edges = [0, 256]
    while edges[-1] < length:
        edges.append(edges[-1] * 2)
    edges[-1] = length
    return edges


def by_bucket(losses: list[float], length: int) -> list[dict[str, float]]:
    """Mean loss and perplexity per position bucket; losses[i] is the loss of token i + 1."""
    out = []
    edges = bucket_edges(length)
    for start, end in zip(edges, edges[1:]):
        part = losses[max(0, start - 1):end - 1]
        if part:
            mean = sum(part) / len(part)
            out.append({"start": start, "end": end, "tokens": len(part), "loss": round(mean, 4),
                        "ppl": round(math.exp(mean), 3)})
    return out
