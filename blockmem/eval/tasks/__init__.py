"""Task generators by name. Each is called as `make_sample(name, tokenizer, length, index, seed,
options)` and returns a `Sample` sized in the tokenizer's tokens; the same arguments always give
the same sample. Groups: `ruler` (the synthetic suite, plus QA when its files are given),
`niah` (the eight needle tasks), `all` (ruler + passkey + perplexity).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

from blockmem.errors import ConfigError
from blockmem.eval.tasks.base import DEFAULT_DEPTHS, Sample, TaskOptions
from blockmem.eval.tasks.qa import qa
from blockmem.eval.tasks.ruler import NIAH, cwe, fwe, niah, vt
from blockmem.model.tokenizer import Tokenizer

Generator = Callable[[Tokenizer, int, int, int, TaskOptions], Sample]


def passkey(tokenizer: Tokenizer, length: int, index: int, seed: int, options: TaskOptions,
            max_new_tokens: int = 8) -> Sample:
    """The classic passkey task (blockmem.eval.passkey, filler haystack), scored by its first number."""
    from blockmem.eval.passkey import QUESTION, make_trial

    trial = make_trial(tokenizer, length - max_new_tokens, index, seed, "filler", depth=options.depth(index))
    context = trial.prompt[:-len(QUESTION)]
    tokens = len(tokenizer.encode(context)) + len(tokenizer.encode(QUESTION, special=False))
    return Sample("passkey", length, index, context, QUESTION, (trial.key,), "first_number", max_new_tokens,
                  trial.depth, ("\n",), tokens)


TASKS: dict[str, Generator] = {
    **{name: partial(niah, name) for name in NIAH},
    "vt": vt,
    "cwe": cwe,
    "fwe": fwe,
    "qa_squad": partial(qa, "qa_squad"),
    "qa_hotpot": partial(qa, "qa_hotpot"),
    "passkey": passkey,
}
PERPLEXITY = "perplexity"  # not a generation task: blockmem.eval.perplexity
GROUPS = {
    "niah": list(NIAH),
    "ruler": [*NIAH, "vt", "cwe", "fwe"],
}


def resolve_tasks(spec: str, options: TaskOptions | None = None) -> list[str]:
    """'ruler,passkey' -> task names, in order, without repeats. `ruler` and `all` take the QA
    tasks only when their files are given."""
    options = options or TaskOptions()
    qa_given = [name for name, path in (("qa_squad", options.squad), ("qa_hotpot", options.hotpot)) if path]
    names: list[str] = []
    for item in filter(None, (part.strip() for part in spec.split(","))):
        if item == "all":
            names += [*GROUPS["ruler"], *qa_given, "passkey", PERPLEXITY]
        elif item == "ruler":
            names += [*GROUPS["ruler"], *qa_given]
        elif item in GROUPS:
            names += GROUPS[item]
        elif item in TASKS or item == PERPLEXITY:
            names.append(item)
        else:
            known = ", ".join([*GROUPS, "all", *TASKS, PERPLEXITY])
            raise ConfigError(f"unknown task {item!r}", f"choose from: {known}")
    if not names:
        raise ConfigError("no tasks given", "e.g. --tasks ruler or --tasks passkey,niah_single_1")
    return list(dict.fromkeys(names))


def make_sample(name: str, tokenizer: Tokenizer, length: int, index: int, seed: int = 0,
                options: TaskOptions | None = None) -> Sample:
    if name not in TASKS:
        raise ConfigError(f"unknown task {name!r}", f"choose from: {', '.join(TASKS)}")
    return TASKS[name](tokenizer, length, index, seed, options or TaskOptions())


__all__ = ["DEFAULT_DEPTHS", "GROUPS", "PERPLEXITY", "Sample", "TASKS", "TaskOptions", "make_sample",
           "resolve_tasks"]
