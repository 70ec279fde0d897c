"""Why a block method missed a passkey: where each sparse layer ranks the needle's block.

    python benchmarks/selection_probe.py --model gemma3-270m --haystack prose --length 32k --trial 0 \\
        --method "infllm:exec_size=64"

Runs one passkey trial with the method and records, for every layer that selects blocks, the query of
the prompt's last execution piece (the one that writes the first answer token) and of the first
decode steps. It then ranks the needle's block (0 = best) among all stored blocks by several
scores computed from the same stored keys and queries:

    selected   whether the method's own selection held the needle's block
    repr       InfLLM: the query sum against the block's mean representative key (infllm only)
    pooled     InfLLM-V2: per query row, softmax over sub-blocks (32 tokens every 16) max-pooled
               to blocks, summed over rows and heads
    exact      the attention mass the queries give each block (log-sum-exp over its keys), i.e.
               what a perfect summary would rank; keys read as the method reads them
    last1      `pooled` from the piece's last query row alone

With --split the trial is answered as a saved memory answers it: the haystack prefilled alone,
then the question as a chunk of its own (docs/memory.md, 128K trial 10).

A diagnostic, not a test: it wraps `SparseLayer._select` to see the queries.
"""

from __future__ import annotations

import argparse
from typing import Any

import torch

import blockmem
from blockmem.attention import create_method
from blockmem.attention.blocksparse import pooled_block_scores
from blockmem.attention.sparse import SparseLayer, grouped_queries
from blockmem.engine.generate import SamplingParams, Stream
from blockmem.eval.passkey import NEEDLE, QUESTION, make_trial, parse_length
from blockmem.eval.systems import parse_method


def answer(model: blockmem.Model, method: Any, prompt: str, new_tokens: int, split: bool) -> str:
    """The prompt answered in one prefill, or (`split`) as a saved memory answers it: the haystack
    prefilled first on its own, then the question as a chunk of its own."""
    if not split:
        return blockmem.Engine(model, method=method).generate(prompt, raw=True, max_new_tokens=new_tokens).text
    engine = blockmem.Engine(model, method=method.for_context(None))  # a saved memory's reading
    cache = engine.new_cache()
    question = model.tokenizer.encode(QUESTION, special=False)  # as SavedMemory.question_ids(raw=True)
    with torch.inference_mode():
        engine.prefill(model.tokenizer.encode(prompt[:-len(QUESTION)]), cache)
        return "".join(Stream(engine._run(question, SamplingParams(max_new_tokens=new_tokens), None, cache=cache)))


def capture(model: blockmem.Model, method: Any, prompt: str, decode_steps: int,
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
        text = answer(model, method, prompt, decode_steps + 1, split)
    finally:
        SparseLayer._select = original  # type: ignore[method-assign]
    return text, seen


def ranks(q: torch.Tensor, keys: torch.Tensor, repr_keys: torch.Tensor | None, block: int, scale: float,
          needle: list[int]) -> dict[str, int]:
    """q: [1, Hq, T, D]; keys: [Hkv, n * block, D] as stored; repr_keys: [n, Hkv, D] or None."""
    heads, _, dim = keys.shape
    n = keys.shape[1] // block
    rows = grouped_queries(q, heads)  # [Hkv, G*T, D]
    kernel = min(32, block)
    pooler = create_method("blocksparse", block_size=block, pool_kernel=kernel, pool_stride=max(1, kernel // 2))
    pooled = torch.stack([pooler.summarize(b, b, b)["pooled"] for b in keys.reshape(heads, n, block, dim).unbind(1)])

    def pooled_score(r: torch.Tensor) -> torch.Tensor:
        return pooled_block_scores(r, pooled, scale).sum(0)

    exact = torch.einsum("hqd,hkd->hqk", rows, keys).reshape(heads, rows.shape[1], n, block) * scale
    scores = {"pooled": pooled_score(rows), "exact": torch.softmax(torch.logsumexp(exact, -1), -1).sum((0, 1)),
              "last1": pooled_score(grouped_queries(q[:, :, -1:], heads))}
    if repr_keys is not None:
        scores["repr"] = torch.einsum("hd,nhd->n", rows.sum(1), repr_keys)

    def rank(s: torch.Tensor) -> int:
        order = torch.argsort(-s, stable=True).tolist()
        return min(order.index(b) for b in needle)

    return {name: rank(s) for name, s in scores.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--method", default="infllm", help="method spec, e.g. 'blocksparse:exec_size=16,position=infllm'")
    parser.add_argument("--length", default="32k")
    parser.add_argument("--trial", type=int, default=0)
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
    trial = make_trial(model.tokenizer, parse_length(args.length), args.trial, haystack=args.haystack)
    needle_text = NEEDLE.format(key=trial.key)
    at = trial.prompt.index(needle_text)
    first = len(model.tokenizer.encode(trial.prompt[:at]))
    last = len(model.tokenizer.encode(trial.prompt[:at + len(needle_text)]))
    needle = sorted({(t - method.n_init) // method.block_size for t in range(first, last)})
    text, seen = capture(model, method, trial.prompt, args.decode_steps, args.split)
    print(f"{args.model} {args.method} {args.length} trial {args.trial}{' (split)' if args.split else ''}: key "
          f"{trial.key}, answer {text!r}, "
          f"needle tokens {first}-{last} in block(s) {needle}\n")
    print("| layer | step | queries | blocks | selected | " + " | ".join(["repr", "pooled", "exact", "last1"]) + " |")
    print("|---:|---|---:|---:|---|---:|---:|---:|---:|")
    for index, (layer, store, steps) in sorted(seen.items()):
        ids = torch.arange(store.num_blocks)[None].expand(store.kv_heads, -1)
        keys = store.gather(ids)[0][0].float()
        reps = store.summary("repr").float() if "repr" in store.summaries else None
        for number, (q, selected) in enumerate(steps):
            found = ranks(q, keys, reps, method.block_size, layer.spec.scale, needle)
            step = "prompt end" if number == 0 else f"decode {number}"
            cells = " | ".join(str(found.get(k, "–")) for k in ("repr", "pooled", "exact", "last1"))
            print(f"| {index} | {step} | {q.shape[2]} | {store.num_blocks} | "
                  f"{'yes' if any(b in selected for b in needle) else 'no'} | {cells} |")


if __name__ == "__main__":
    main()
