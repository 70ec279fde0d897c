"""RULER's QA tasks: a question answered from one (SQuAD) or two (HotpotQA) gold paragraphs hidden
among distractor paragraphs of other questions, scored with `part` (any reference answer).

The data sets are not shipped and never downloaded: pass the files you have (SQuAD v1.1/v2.0
`dev-*.json`; HotpotQA `hotpot_dev_distractor_v1.json`) with `--qa-squad` / `--qa-hotpot`.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

from blockmem.errors import ConfigError
from blockmem.eval.tasks.base import Sample, TaskOptions, fit, per_unit, rng_for
from blockmem.model.tokenizer import Tokenizer

Item = tuple[str, tuple[str, ...], tuple[str, ...]]  # question, answers, gold paragraphs


@lru_cache(maxsize=4)
def _read(path: str, kind: str) -> tuple[tuple[Item, ...], tuple[str, ...]]:
    """(answerable items, every paragraph) of a SQuAD or HotpotQA file."""
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"{kind} file not found: {path}", f"pass the {kind} JSON file you have (it is never "
                          "downloaded)")
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
        items: list[Item] = []
        paragraphs: list[str] = []
        if kind == "SQuAD":
            for article in data["data"]:
                for paragraph in article["paragraphs"]:
                    paragraphs.append(paragraph["context"])
                    for qa in paragraph["qas"]:
                        answers = tuple(dict.fromkeys(a["text"] for a in qa["answers"]))
                        if answers and not qa.get("is_impossible"):
                            items.append((qa["question"], answers, (paragraph["context"],)))
        else:
            for entry in data:
                texts = {title: "".join(sentences) for title, sentences in entry["context"]}
                paragraphs.extend(texts.values())
                gold = tuple(dict.fromkeys(texts[t] for t, _ in entry["supporting_facts"] if t in texts))
                if gold:
                    items.append((entry["question"], (entry["answer"],), gold))
    except (KeyError, TypeError, ValueError) as exc:
        raise ConfigError(f"{path} is not a {kind} file ({type(exc).__name__}: {exc})",
                          f"pass the {kind} dev set JSON as published") from None
    if not items:
        raise ConfigError(f"{path} has no answerable {kind} questions")
    return tuple(items), tuple(dict.fromkeys(paragraphs))


def qa(name: str, tokenizer: Tokenizer, length: int, index: int, seed: int, options: TaskOptions,
       max_new_tokens: int = 32) -> Sample:
    kind, path = ("SQuAD", options.squad) if name == "qa_squad" else ("HotpotQA", options.hotpot)
    if not path:
        raise ConfigError(f"{name} needs the {kind} file", f"pass --qa-{'squad' if kind == 'SQuAD' else 'hotpot'} "
                          "FILE (the data set is not shipped or downloaded)")
    items, paragraphs = _read(path, kind)
    rng = rng_for(name, seed, length, index)
    question, answers, gold = items[rng.randrange(len(items))]
    depth = options.depth(index)
    distractors = [p for p in paragraphs if p not in gold]
    rng.shuffle(distractors)
    budget = length - max_new_tokens
    instruction = "Answer the question using the documents. Give only the answer and no other words."
    tail = f"\n\n{instruction}\n\nQuestion: {question}\nAnswer:"

    def render(n: int) -> tuple[str, str]:
        docs = [f"{p}\n\n" for p in distractors[:n]]
        docs.insert(round(len(docs) * depth), "\x00".join(gold))
        parts = [d for doc in docs for d in doc.split("\x00")]  # gold paragraphs stay together
        body = "".join(f"Document {i + 1}:\n{p.rstrip()}\n\n" for i, p in enumerate(parts))
        return f"{instruction}\n\nThe documents:\n\n{body}", tail

    estimate = int(budget / per_unit(tokenizer, distractors[:50]))
    _, context, tail, tokens = fit(tokenizer, budget, render, max(1, estimate), name, most=len(distractors))
    return Sample(name, length, index, context, tail, answers, "part", max_new_tokens, depth, (), tokens)
