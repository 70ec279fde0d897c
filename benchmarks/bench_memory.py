"""Tiers and saved memories, measured: peak RSS under a RAM budget, time to first answer token
from a saved memory vs prefilling the document again, decode speed with blocks on disk vs all
in RAM, and passkey retrieval from saved memories reopened in new processes.

    python benchmarks/bench_memory.py rss --lengths 32k,128k,256k --ram-budget 256MB
    python benchmarks/bench_memory.py ttft --length 64k
    python benchmarks/bench_memory.py decode --length 128k --methods infllm,blocksparse,nosa
    python benchmarks/bench_memory.py passkey --length 128k --trials 10
    python benchmarks/bench_memory.py dtype --length 16k --trials 5 --new-tokens 8

The document is a passkey haystack (filler text, trial N of the seed) without its question; the
question is asked raw ("What is the pass key? The pass key is"). Every build, question and full
run is its own process, so peak RSS is that step's own and "reopened in a new process" is
literal. Memories go to --workdir (default: a temporary folder, removed at the end). Results
are printed as a table and appended as JSON lines to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


# ---- workers (run in their own process) ---------------------------------------------------------

def _rss_now() -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def _setup(args: argparse.Namespace):
    import torch

    import blockmem
    from blockmem.eval.passkey import QUESTION, make_trial, parse_length
    from blockmem.memory.tiers import TierConfig, parse_size

    torch.set_num_threads(args.threads)
    model = blockmem.load(args.model, device=args.device)
    model_rss = _rss_now()
    trial = make_trial(model.tokenizer, parse_length(args.length), args.trial)
    assert trial.prompt.endswith(QUESTION)
    budget = parse_size(args.ram_budget) if args.ram_budget else None
    tiers = TierConfig(ram_budget=budget, spill_dir=args.workdir) if budget else None
    return model, model_rss, trial, tiers, QUESTION


def worker_build(args: argparse.Namespace) -> dict:
    from blockmem.attention import create_method
    from blockmem.engine.saved import SavedMemory
    from blockmem.engine.stats import peak_rss_bytes
    from passkey import parse_method

    model, model_rss, trial, tiers, question = _setup(args)
    name, options = parse_method(args.method)
    started = time.perf_counter()
    memory = SavedMemory.build(model, [("haystack.txt", trial.prompt[: -len(question)])], args.memory,
                               create_method(name, **options), tiers=tiers, raw=True)
    return {"step": "build", "seconds": round(time.perf_counter() - started, 2), "tokens": memory.tokens,
            "file_bytes": memory.info()["file_bytes"], "peak_rss": peak_rss_bytes(), "model_rss": model_rss}


def worker_ask(args: argparse.Namespace) -> dict:
    from blockmem.engine.saved import SavedMemory
    from blockmem.engine.stats import peak_rss_bytes

    model, model_rss, trial, tiers, question = _setup(args)
    started = time.perf_counter()
    memory = SavedMemory.open(args.memory, model, tiers)
    opened = time.perf_counter() - started
    # --warm: every block read into RAM before the question (the all-in-RAM baseline)
    stream = memory.stream(question, raw=True, preload=args.warm, max_new_tokens=args.new_tokens,
                           ignore_eos=args.new_tokens > 8)
    first = None
    pieces = []
    ask_started = time.perf_counter()
    for piece in stream:
        first = first or time.perf_counter()
        pieces.append(piece)
    out = stream.completion
    stats = out.stats
    return {"step": "ask", "open_seconds": round(opened, 4),
            "ttft": round((opened if not args.warm else 0) + stats.time_to_first_token, 4),
            "decode_tps": round(stats.decode_tokens_per_second, 2), "moved_per_token": stats.bytes_moved_per_token,
            "answer": out.text.strip()[:40], "correct": trial.score(out.text), "peak_rss": peak_rss_bytes(),
            "model_rss": model_rss, "memory_tokens": stats.memory_tokens, "wall": round(time.perf_counter() -
                                                                                       ask_started, 2)}


def worker_full(args: argparse.Namespace) -> dict:
    import blockmem
    from blockmem.attention import create_method
    from blockmem.engine.stats import peak_rss_bytes
    from passkey import parse_method

    model, model_rss, trial, tiers, _ = _setup(args)
    name, options = parse_method(args.method)
    engine = blockmem.Engine(model, create_method(name, **options), tiers=tiers)
    out = engine.generate(trial.prompt, raw=True, max_new_tokens=args.new_tokens)
    return {"step": "full", "ttft": round(out.stats.time_to_first_token, 2), "answer": out.text.strip()[:40],
            "correct": trial.score(out.text), "peak_rss": peak_rss_bytes(), "model_rss": model_rss}


WORKERS = {"build": worker_build, "ask": worker_ask, "full": worker_full}


# ---- driver -----------------------------------------------------------------------------------

def step(args: argparse.Namespace, kind: str, length: str, memory: Path, *, method: str | None = None,
         ram_budget: str | None = None, trial: int = 0, warm: bool = False, new_tokens: int = 8) -> dict:
    command = [sys.executable, __file__, "--worker", kind, "--length", length, "--memory", str(memory),
               "--method", method or args.method, "--trial", str(trial), "--threads", str(args.threads),
               "--model", args.model, "--device", args.device, "--new-tokens", str(new_tokens),
               "--workdir", str(args.workdir)]
    if ram_budget:
        command += ["--ram-budget", ram_budget]
    if warm:
        command.append("--warm")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), str(HERE.parent), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    if result.returncode != 0:
        raise SystemExit(f"{kind} step failed:\n{result.stderr[-3000:]}")
    record = json.loads(result.stdout.strip().splitlines()[-1])
    record.update({"length": length, "method": method or args.method, "ram_budget": ram_budget, "trial": trial,
                   "warm": warm})
    print(json.dumps(record), flush=True)
    if args.out:
        with open(args.out, "a") as handle:
            handle.write(json.dumps({"bench": args.command, **record}) + "\n")
    return record


def mib(n: float | None) -> str:
    return "-" if n is None else f"{n / 2**20:.0f}"


def cmd_rss(args: argparse.Namespace) -> None:
    from blockmem.eval.passkey import parse_length
    from blockmem.memory.tiers import parse_size
    from blockmem.model.loader import load

    kv_per_token = load(args.model, device="cpu").config.kv_bytes_per_token(4)
    budget = parse_size(args.ram_budget)
    rows = []
    for length in args.lengths.split(","):
        path = args.workdir / f"rss-{length}.bmem"
        build = step(args, "build", length, path, ram_budget=args.ram_budget)
        ask = step(args, "ask", length, path, ram_budget=args.ram_budget)
        rows.append((length, build, ask))
        path.unlink()
    print(f"\n| context | dense fp32 KV | model RSS | RAM budget | peak RSS, build | peak RSS, question | limit "
          f"(model + budget + 300 MiB) | met | answer |\n|---|---:|---:|---:|---:|---:|---:|---|---|")
    for length, build, ask in rows:
        limit = build["model_rss"] + budget + 300 * 2**20
        met = "yes" if max(build["peak_rss"], ask["peak_rss"]) <= limit else "NO"
        dense = kv_per_token * parse_length(length)
        print(f"| {length} ({build['tokens']} tok) | {dense / 2**30:.1f} GiB | {mib(build['model_rss'])} MiB | "
              f"{mib(budget)} MiB | {mib(build['peak_rss'])} MiB | {mib(ask['peak_rss'])} MiB | {mib(limit)} MiB | "
              f"{met} | {ask['answer']!r} ({'right' if ask['correct'] else 'wrong'}) |")


def cmd_ttft(args: argparse.Namespace) -> None:
    path = args.workdir / f"ttft-{args.length}.bmem"
    build = step(args, "build", args.length, path, ram_budget=args.ram_budget)
    asks, fulls = [], []
    for rep in range(args.reps):  # interleaved: drift hits both
        asks.append(step(args, "ask", args.length, path))
        if rep < args.full_reps:
            fulls.append(step(args, "full", args.length, path))
    memory_ttft = statistics.median(a["ttft"] for a in asks)
    full_ttft = statistics.median(f["ttft"] for f in fulls)
    same = {a["answer"] for a in asks} == {f["answer"] for f in fulls}
    print(f"\nTTFT at {args.length} ({build['tokens']} memory tokens, {args.method}): saved memory "
          f"{memory_ttft:.3f} s (median of {len(asks)}, open included: {asks[0]['open_seconds']:.3f} s; range "
          f"{min(a['ttft'] for a in asks):.3f}-{max(a['ttft'] for a in asks):.3f}) vs prefilling again "
          f"{full_ttft:.1f} s (median of {len(fulls)}): {full_ttft / memory_ttft:.0f}x faster; same answer: {same} "
          f"({asks[0]['answer']!r} vs {fulls[0]['answer']!r})")


def cmd_decode(args: argparse.Namespace) -> None:
    rows = []
    for method in args.methods.split(","):
        path = args.workdir / f"decode-{method}.bmem"
        step(args, "build", args.length, path, method=method, ram_budget=args.ram_budget)
        disk, ram = [], []
        for _ in range(args.reps):
            disk.append(step(args, "ask", args.length, path, method=method, ram_budget=args.ram_budget,
                             new_tokens=args.new_tokens))
            ram.append(step(args, "ask", args.length, path, method=method, warm=True, new_tokens=args.new_tokens))
        rows.append((method, disk, ram))
        path.unlink()
    print(f"\n| method | decode tok/s, disk tier ({args.ram_budget} RAM) | decode tok/s, all in RAM | ratio | "
          f"MiB moved per token, disk tier | MiB moved per token, all in RAM | peak RSS disk / RAM |\n"
          f"|---|---:|---:|---:|---:|---:|---|")
    for method, disk, ram in rows:
        d, r = statistics.median(x["decode_tps"] for x in disk), statistics.median(x["decode_tps"] for x in ram)
        print(f"| {method} | {d:.1f} | {r:.1f} | {d / r:.2f} | {disk[0]['moved_per_token'] / 2**20:.2f} | "
              f"{ram[0]['moved_per_token'] / 2**20:.2f} | {mib(disk[0]['peak_rss'])} / {mib(ram[0]['peak_rss'])} MiB |")


def cmd_passkey(args: argparse.Namespace) -> None:
    from concurrent.futures import ThreadPoolExecutor

    def trial(index: int) -> bool:
        path = args.workdir / f"passkey-{index}.bmem"
        step(args, "build", args.length, path, trial=index, ram_budget=args.ram_budget)
        ask = step(args, "ask", args.length, path, trial=index, ram_budget=args.ram_budget)
        path.unlink()
        return bool(ask["correct"])

    with ThreadPoolExecutor(args.jobs) as pool:  # accuracy only: trials may share the machine
        right = sum(pool.map(trial, range(args.trials)))
    print(f"\npasskey from saved {args.length} memories reopened in a new process ({args.method}): "
          f"{right}/{args.trials}")


def cmd_dtype(args: argparse.Namespace) -> None:
    """Storage dtype vs float32 blocks: the first answer token's logits, the greedy answer, the key."""
    import torch

    import blockmem
    from blockmem.attention import create_method
    from blockmem.eval.passkey import make_trial, parse_length
    from blockmem.memory.tiers import TierConfig
    from passkey import parse_method

    torch.set_num_threads(args.threads)
    model = blockmem.load(args.model, device=args.device)
    name, options = parse_method(args.method)
    rows = []
    for index in range(args.trials):
        trial = make_trial(model.tokenizer, parse_length(args.length), index)
        ids = model.tokenizer.encode(trial.prompt)
        results = {}
        for dtype in ("float32", "float16", "bfloat16"):
            engine = blockmem.Engine(model, create_method(name, **options),
                                     tiers=TierConfig(storage_dtype=getattr(torch, dtype)))
            cache = engine.new_cache()
            logits = engine.prefill(ids, cache)
            first = logits.clone()
            tokens = []
            for _ in range(args.new_tokens):
                tokens.append(int(logits.argmax()))
                logits = engine._forward([tokens[-1]], cache)
            cache.close()
            text = model.tokenizer.decode(tokens)
            results[dtype] = (first, tokens, text)
        base_logits, base_tokens, _ = results["float32"]
        for dtype, (first, tokens, text) in results.items():
            record = {"bench": "dtype", "length": args.length, "trial": index, "storage_dtype": dtype,
                      "max_logit_diff": round(float((first - base_logits).abs().max()), 5),
                      "same_tokens": tokens == base_tokens, "answer": text.strip()[:20], "correct": trial.score(text)}
            rows.append(record)
            print(json.dumps(record), flush=True)
            if args.out:
                with open(args.out, "a") as handle:
                    handle.write(json.dumps(record) + "\n")
    print(f"\n| storage dtype | passkey right | same greedy tokens as float32 | max logit diff, first token "
          f"(median) |\n|---|---:|---:|---:|")
    for dtype in ("float32", "float16", "bfloat16"):
        mine = [r for r in rows if r["storage_dtype"] == dtype]
        print(f"| {dtype} | {sum(r['correct'] for r in mine)}/{len(mine)} | {sum(r['same_tokens'] for r in mine)}/"
              f"{len(mine)} | {statistics.median(r['max_logit_diff'] for r in mine):.4f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("command", nargs="?", choices=["rss", "ttft", "decode", "passkey", "dtype"])
    parser.add_argument("--model", default="smollm2-135m", help="short name, .gguf path or HF directory")
    parser.add_argument("--method", default="infllm", help="method spec as in passkey.py, e.g. infllm:topk=8")
    parser.add_argument("--methods", default="infllm,blocksparse,nosa", help="decode: comma-separated methods")
    parser.add_argument("--length", default="64k", help="ttft/decode/passkey: context length in model tokens")
    parser.add_argument("--lengths", default="32k,128k,256k", help="rss: comma-separated context lengths")
    parser.add_argument("--ram-budget", default=None, help="RAM budget for blocks, e.g. 256MB (rss: default 256MB)")
    parser.add_argument("--reps", type=int, default=3, help="ttft: questions asked; decode: repetitions per variant")
    parser.add_argument("--full-reps", type=int, default=1, help="ttft: full prefills (each a whole prefill)")
    parser.add_argument("--trials", type=int, default=10, help="passkey/dtype: trials (passkey: one memory each)")
    parser.add_argument("--jobs", type=int, default=1, help="passkey: trials run side by side (accuracy only)")
    parser.add_argument("--new-tokens", type=int, default=8, help="tokens generated per question")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--workdir", type=Path, default=None, help="where memories and spill files go")
    parser.add_argument("--out", default=None, help="append JSON lines here")
    parser.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    parser.add_argument("--memory", help=argparse.SUPPRESS)
    parser.add_argument("--trial", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--warm", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(WORKERS[args.worker](args)))
        return
    if args.command is None:
        parser.error("choose a measurement: rss, ttft, decode, passkey or dtype")
    if args.command == "rss" and args.ram_budget is None:
        args.ram_budget = "256MB"
    with tempfile.TemporaryDirectory(prefix="bench-memory-", dir=args.workdir) as scratch:
        args.workdir = Path(scratch)
        {"rss": cmd_rss, "ttft": cmd_ttft, "decode": cmd_decode, "passkey": cmd_passkey,
         "dtype": cmd_dtype}[args.command](args)


if __name__ == "__main__":
    main()
