"""What choosing blocks costs, by method and memory size, against the attention it chooses for.

    python benchmarks/selection_cost.py --methods "infllm;infllm:pooled_fraction=0.5" --tokens 8k,64k

For each memory size, one layer of SmolLM2's shape (9 query heads, 3 KV heads, head dim 64) with
random block summaries; times the method's `select` for a prefill piece (`--rows` queries, default
InfLLM's 512) and for a decode step after it (1 query; a method that holds a piece's pick for
the steps, `infllm --pooled-hold`, reuses it), and, for scale, attention of the same queries over
the method's budget of keys. Methods and attention are timed in the same run, alternating, on
`--threads` threads; medians of `--reps`. Summaries are random: this measures cost, not choices.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any, Callable

import torch
import torch.nn.functional as F

from blockmem.attention import create_method
from blockmem.attention.base import LayerSpec
from blockmem.attention.sparse import Held
from blockmem.errors import run_script
from blockmem.eval.passkey import parse_length
from blockmem.eval.systems import parse_method, split_methods

SPEC = LayerSpec(0, num_heads=9, num_kv_heads=3, head_dim=64, scale=64 ** -0.5, window=None)


class Summaries:
    """Stands in for a BlockStore: only `summary(name)` is read by `select`."""

    def __init__(self, method: Any, blocks: int) -> None:
        keys = torch.randn(SPEC.num_kv_heads, method.block_size, SPEC.head_dim)
        one = method.summarize(keys, keys, torch.rand(SPEC.num_kv_heads, method.block_size))
        self.arrays = {name: torch.randn(value.shape[0], blocks, *value.shape[1:]) for name, value in one.items()}

    def summary(self, name: str) -> torch.Tensor:
        return self.arrays[name]


def median_ms(fn: Callable[[], Any], reps: int) -> float:
    fn()  # warm up
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", default="infllm;infllm:pooled_fraction=0.5",
                        help="method specs; ';' separates methods whose options contain commas")
    parser.add_argument("--tokens", default="8k,64k", help="memory sizes in tokens")
    parser.add_argument("--rows", type=int, default=512, help="queries of a prefill piece")
    parser.add_argument("--reps", type=int, default=9)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    methods = [(spec, create_method(name, **options)) for spec in split_methods(args.methods)
               for name, options in [parse_method(spec)]]
    print(f"| method | memory | select, {args.rows} queries ms | select, 1 query ms | "
          f"attention over the budget, {args.rows} / 1 queries ms |")
    print("|---|---:|---:|---:|---:|")
    for tokens in (parse_length(item) for item in args.tokens.split(",")):
        for spec, method in methods:
            store = Summaries(method, tokens // method.block_size)
            keys = torch.randn(1, SPEC.num_kv_heads, method.budget(), SPEC.head_dim)
            cells, held = [], Held()  # the piece's pick, held for the step by methods that keep one
            for rows in (args.rows, 1):
                q = torch.randn(1, SPEC.num_heads, rows, SPEC.head_dim)
                cells.append(median_ms(lambda: method.select(q, store, SPEC, tokens, held), args.reps))
            attention = []
            for rows in (args.rows, 1):
                q = torch.randn(1, SPEC.num_heads, rows, SPEC.head_dim)
                attention.append(median_ms(lambda: F.scaled_dot_product_attention(q, keys, keys, enable_gqa=True),
                                           args.reps))
            print(f"| {spec} | {tokens // 1024}K | {cells[0]:.2f} | {cells[1]:.2f} | "
                  f"{attention[0]:.1f} / {attention[1]:.2f} |")


if __name__ == "__main__":
    run_script(main)
