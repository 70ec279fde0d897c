"""Why a block method missed a passkey: where each sparse layer ranks the needle's block.

    python benchmarks/selection_probe.py --model gemma3-270m --haystack prose --length 32k --trial 0 \\
        --method "infllm:exec_size=64"

Runs one passkey trial (or, with --task, one sample of a RULER needle task) with the method and
records, for every layer that selects blocks, the query of the prompt's last execution piece (the
one that writes the first answer token) and of the first decode steps. It then ranks the needle's
block (0 = best; "4/20" for a needle split over two blocks) among all stored blocks by several
scores computed from the same stored keys and queries:

    selected   which of the needle's blocks the method's own selection held
    repr       InfLLM: the query sum against the block's mean representative key (infllm only)
    pooled     InfLLM-V2: per query row, softmax over sub-blocks (32 tokens every 16) max-pooled
               to blocks, summed over rows and heads
    exact      the attention mass the queries give each block (log-sum-exp over its keys), i.e.
               what a perfect summary would rank; keys read as the method reads them
    last1      `pooled` from the piece's last query row alone
    head       `pooled` from one query head's rows alone: the best rank any query head gives
               any of the needle's blocks, and which head ("0 h2"): what a selection per query
               head could reach where a KV head's query heads outvote one another

    python benchmarks/selection_probe.py --task niah_single_2 --length 8k --trial 1 --method infllm

With --split the trial is answered as a saved memory answers it: the haystack prefilled alone,
then the question as a chunk of its own (docs/memory.md, 128K trial 10).

A diagnostic, not a test: it wraps `SparseLayer._select` to see the queries.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Any

import torch

import blockmem
from blockmem.attention import create_method
from blockmem.attention.blocksparse import pooled_block_scores
from blockmem.attention.sparse import SparseLayer, grouped_queries
from blockmem.engine.generate import SamplingParams, Stream
from blockmem.errors import run_script
from blockmem.eval.passkey import NEEDLE, QUESTION, make_trial, parse_length
from blockmem.eval.systems import parse_method
from blockmem.eval.tasks import make_sample
from blockmem.eval.tasks.ruler import NEEDLE_START, NIAH
from blockmem.model.tokenizer import Tokenizer


SCORES = ("repr", "pooled", "exact", "last1", "head")  # the table's rank columns, in order


@dataclass(frozen=True)
class Target:
    """One prompt to probe: as one piece (`whole`, what the benchmark feeds) and as (haystack,
    question) for --split; `needles` are the token spans that hold the asked values."""

    label: str
    expected: str
    whole: list[int]
    haystack: list[int]
    question: list[int]
    needles: list[tuple[int, int]]


def passkey_target(tokenizer: Tokenizer, length: int, trial: int, haystack: str) -> Target:
    made = make_trial(tokenizer, length, trial, haystack=haystack)
    needle_text = NEEDLE.format(key=made.key)
    at = made.prompt.index(needle_text)
    span = (len(tokenizer.encode(made.prompt[:at])), len(tokenizer.encode(made.prompt[:at + len(needle_text)])))
    return Target(f"passkey trial {trial}", made.key, tokenizer.encode(made.prompt),
                  # as SavedMemory.question_ids(raw=True)
                  tokenizer.encode(made.prompt[:-len(QUESTION)]), tokenizer.encode(QUESTION, special=False), [span])


def ruler_target(tokenizer: Tokenizer, task: str, length: int, index: int) -> Target:
    """A RULER needle task's sample as the eval runner feeds it (context ids + question ids)."""
    if task not in NIAH:
        raise SystemExit(f"--task {task}: the probe needs a needle task, one of {', '.join(NIAH)}")
    sample = make_sample(task, tokenizer, length, index)
    context, question = sample.prompt_ids(tokenizer)
    needles = []
    for value in sample.references:
        end = sample.context.index(value) + len(value)
        start = sample.context.rfind(NEEDLE_START, 0, end)
        needles.append((len(tokenizer.encode(sample.context[:start])), len(tokenizer.encode(sample.context[:end]))))
    return Target(f"{task} #{index} (depth {sample.depth})", ", ".join(sample.references), context + question,
                  context, question, needles)


def answer(model: blockmem.Model, method: Any, target: Target, new_tokens: int, split: bool) -> str:
    """The prompt answered in one prefill, or (`split`) as a saved memory answers it: the haystack
    prefilled first on its own, then the question as a chunk of its own."""
    if not split:
        return blockmem.Engine(model, method=method).generate(prompt_ids=target.whole, max_new_tokens=new_tokens).text
    engine = blockmem.Engine(model, method=method.for_context(None))  # a saved memory's reading
    cache = engine.new_cache()
    with torch.inference_mode():
        engine.prefill(target.haystack, cache)
        return "".join(Stream(engine._run(target.question, SamplingParams(max_new_tokens=new_tokens), None,
                                          cache=cache)))


def capture(model: blockmem.Model, method: Any, target: Target, decode_steps: int,
            split: bool = False) -> tuple[str, dict[int, Any]]:
    """Generate; per sparse layer: (layer, store, [last prefill piece query, first decode queries])."""
    seen: dict[int, Any] = {}
    original = SparseLayer._select

    def select(layer: SparseLayer, q: torch.Tensor, store: Any, length: int) -> torch.Tensor:
        ids = original(layer, q, store, length)
        _, _, steps = seen.setdefault(layer.spec.index, [layer, store, []])
        record = (q.detach().float().clone(), ids[0].tolist())
        if q.shape[2] > 1:
            steps[:] = [record]  # a later prefill piece replaces the earlier ones
        elif len(steps) <= decode_steps:
            steps.append(record)
        return ids

    SparseLayer._select = select  # type: ignore[method-assign]
    try:
        text = answer(model, method, target, decode_steps + 1, split)
    finally:
        SparseLayer._select = original  # type: ignore[method-assign]
    return text, seen


def ranks(q: torch.Tensor, keys: torch.Tensor, repr_keys: torch.Tensor | None, block: int, scale: float,
          needle: list[int]) -> dict[str, str]:
    """q: [1, Hq, T, D]; keys: [Hkv, n * block, D] as stored; repr_keys: [Hkv, n, D] or None."""
    heads, _, dim = keys.shape
    n = keys.shape[1] // block
    rows = grouped_queries(q, heads)  # [Hkv, G*T, D]
    kernel = min(32, block)
    pooler = create_method("blocksparse", block_size=block, pool_kernel=kernel, pool_stride=max(1, kernel // 2))
    pooled = torch.stack([pooler.summarize(b, b, b)["pooled"] for b in keys.reshape(heads, n, block, dim).unbind(1)],
                         dim=1)  # [Hkv, n, sub, D], as a store holds them

    def pooled_score(r: torch.Tensor) -> torch.Tensor:
        return pooled_block_scores(r, pooled, scale).sum(0)

    exact = torch.einsum("hqd,hkd->hqk", rows, keys).reshape(heads, rows.shape[1], n, block) * scale
    scores = {"pooled": pooled_score(rows), "exact": torch.softmax(torch.logsumexp(exact, -1), -1).sum((0, 1)),
              "last1": pooled_score(grouped_queries(q[:, :, -1:], heads))}
    if repr_keys is not None:
        scores["repr"] = torch.einsum("hd,hnd->n", rows.sum(1), repr_keys)

    def positions(s: torch.Tensor) -> list[int]:
        order = torch.argsort(-s, stable=True).tolist()
        return [order.index(b) for b in needle]

    def rank(s: torch.Tensor) -> str:  # one rank per needle block: "4/20" for a needle in blocks 15 and 16
        return "/".join(str(r) for r in positions(s))

    found = {name: rank(s) for name, s in scores.items()}
    group, length = rows.shape[1] // q.shape[2], q.shape[2]
    per_head = []  # (the needle's best rank by one query head's pooled score, that query head)
    for g in range(group):
        by_kv_head = pooled_block_scores(rows[:, g * length:(g + 1) * length], pooled, scale)  # [Hkv, n]
        per_head += [(min(positions(s)), h * group + g) for h, s in enumerate(by_kv_head)]
    best, head = min(per_head)
    found["head"] = f"{best} h{head}"
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--method", default="infllm",
                        help="method spec, e.g. 'blocksparse:exec_size=16,position=infllm'")
    parser.add_argument("--length", default="32k")
    parser.add_argument("--trial", type=int, default=0, help="passkey trial, or the task's sample index")
    parser.add_argument("--task", help="probe a sample of this RULER needle task (e.g. niah_single_2) "
                        "instead of a passkey trial")
    parser.add_argument("--haystack", default="filler", choices=["filler", "prose"])
    parser.add_argument("--decode-steps", type=int, default=2, help="decode steps probed after the prompt")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--split", action="store_true", help="answer as a saved memory does: the haystack "
                        "prefilled on its own, then the question as its own chunk")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = blockmem.load(args.model, device="cpu")
    name, options = parse_method(args.method)
    method = create_method(name, **options)
    length = parse_length(args.length)
    target = ruler_target(model.tokenizer, args.task, length, args.trial) if args.task else \
        passkey_target(model.tokenizer, length, args.trial, args.haystack)
    needle = sorted({(t - method.n_init) // method.block_size for first, last in target.needles
                     for t in range(first, last)})
    text, seen = capture(model, method, target, args.decode_steps, args.split)
    spans = ", ".join(f"{first}-{last}" for first, last in target.needles)
    print(f"{args.model} {args.method} {args.length} {target.label}{' (split)' if args.split else ''}: expected "
          f"{target.expected}, answer {text!r}, needle tokens {spans} in block(s) {needle}\n")
    print("| layer | step | queries | blocks | selected | " + " | ".join(SCORES) + " |")
    print("|---:|---|---:|---:|---|" + "---:|" * len(SCORES))
    for index, (layer, store, steps) in sorted(seen.items()):
        ids = torch.arange(store.num_blocks)[None].expand(store.kv_heads, -1)
        keys = store.gather(ids)[0][0].float()
        reps = store.summary("repr").float() if "repr" in store.summaries else None
        stored = [b for b in needle if b < store.num_blocks]  # a needle in the window has no block yet
        for number, (q, selected) in enumerate(steps):
            found = ranks(q, keys, reps, method.block_size, layer.spec.scale, stored) if stored else \
                dict.fromkeys(SCORES, "window")
            step = "prompt end" if number == 0 else f"decode {number}"
            cells = " | ".join(str(found.get(k, "–")) for k in SCORES)
            print(f"| {index} | {step} | {q.shape[2]} | {store.num_blocks} | "
                  f"{','.join(str(b) for b in needle if b in selected) or 'none'} | {cells} |")


if __name__ == "__main__":
    run_script(main)
