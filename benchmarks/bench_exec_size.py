"""Prefill speed and answer by execution-piece size, the methods interleaved in one process.

    python benchmarks/bench_exec_size.py --length 16k \\
        --methods "infllm;infllm:exec_size=64;blocksparse;blocksparse:exec_size=64"

Each repetition runs every method once on the same passkey prompt (trial 0 of --haystack), so
drift hits all of them; prints prefill and decode tok/s and the answer per run.
"""

from __future__ import annotations

import argparse

import torch

import blockmem
from blockmem.errors import run_script
from blockmem.eval.passkey import make_trial, parse_length
from passkey import parse_method


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m", help="short name, .gguf path or HF directory")
    parser.add_argument("--length", default="16k", help="prompt length in model tokens")
    parser.add_argument("--haystack", default="filler", choices=["filler", "prose"])
    parser.add_argument("--methods", default="infllm;infllm:exec_size=64;blocksparse;blocksparse:exec_size=64",
                        help="';'-separated method specs, as in passkey.py")
    parser.add_argument("--reps", type=int, default=2, help="repetitions")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = blockmem.load(args.model, device="cpu")
    trial = make_trial(model.tokenizer, parse_length(args.length), 0, haystack=args.haystack)
    for rep in range(args.reps):
        for spec in args.methods.split(";"):
            name, options = parse_method(spec)
            out = blockmem.Engine(model, method=blockmem.create_method(name, **options)).generate(
                trial.prompt, raw=True, max_new_tokens=8)
            print(f"rep {rep + 1} | {spec} | prefill {out.stats.prefill_tokens_per_second:.1f} tok/s | "
                  f"decode {out.stats.decode_tokens_per_second:.1f} tok/s | {out.text!r} (key {trial.key})", flush=True)


if __name__ == "__main__":
    run_script(main)
