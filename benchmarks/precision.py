"""What a precision costs in accuracy: decode steps of bfloat16 and int4 against float32.

A 1K-token prompt of King James prose is prefilled, then 512 more tokens are fed one at a time
(teacher forced, so every precision sees the same tokens) and each step's logits are compared
with float32's: how often the greedy choice agrees, the mean next-token loss, the largest logit
difference.

    python benchmarks/precision.py smollm2-135m gemma3-270m
"""

from __future__ import annotations

import argparse

import torch

import blockmem
from blockmem.errors import run_script
from blockmem.eval.text import prose_verses

PROMPT, STEPS = 1024, 512


def decode_logits(model: blockmem.Model, ids: list[int]) -> torch.Tensor:
    engine = blockmem.Engine(model)
    cache = engine.new_cache()
    engine.prefill(ids[:PROMPT - 1], cache)
    inputs = ids[PROMPT - 1:PROMPT + STEPS - 1]  # the token before each target, one step each
    return torch.stack([model.decoder(torch.tensor([[token]]), cache)[0, -1].float() for token in inputs])


@torch.inference_mode()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("models", nargs="+", help="catalog names or model paths")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    text = " ".join(prose_verses()[1000:1400])
    print("| model | precision | same greedy choice as float32 | mean loss | max logit diff |")
    print("|---|---|---:|---:|---:|")
    for name in args.models:
        reference = blockmem.load(name, dtype="float32", device="cpu")
        ids = reference.tokenizer.encode(text)[:PROMPT + STEPS]
        targets = torch.tensor(ids[PROMPT:])
        base = decode_logits(reference, ids)
        loss = torch.nn.functional.cross_entropy(base, targets).item()
        print(f"| {name} | float32 | - | {loss:.3f} | - |")
        for precision in ("bfloat16", "int4"):
            got = decode_logits(blockmem.load(name, dtype=precision, device="cpu"), ids)
            agree = (got.argmax(-1) == base.argmax(-1)).float().mean().item()
            loss = torch.nn.functional.cross_entropy(got, targets).item()
            print(f"| {name} | {precision} | {agree:.1%} | {loss:.3f} | {(got - base).abs().max().item():.2f} |")


if __name__ == "__main__":
    run_script(main)
