"""blockmem dense vs Hugging Face transformers (SDPA, fp32): prefill and decode speed.

Same process, same weights (both load the same GGUF and dequantize it to float32), same prompt
tokens, same thread count, greedy decoding; the two systems alternate (A, B, A, B, ...) so drift
hits both, and each figure is the median of --reps runs after one warm-up.

    python benchmarks/bench_dense.py --lengths 1024,4096,8160 --reps 3 --threads 2

--dtype bfloat16 runs both systems in bfloat16; --dtype int4 runs blockmem with 4-bit weights
(bfloat16 compute) against transformers in float32, the reference the Foundation issue names.

Prints a table of medians (with min-max spread) and the blockmem/transformers ratios, and writes
the same as JSON with --out. Ratios > 1 mean blockmem is faster.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

import blockmem
from blockmem.engine.stats import peak_rss_bytes
from blockmem.errors import run_script
from blockmem.eval.systems import cache_kwargs

TEXT = ("The library opens at nine. Readers come for newspapers, students for quiet tables, and the old "
        "men for the chess boards by the window. In the afternoon the light moves across the shelves. ")


def prompt_ids(model: blockmem.Model, length: int) -> list[int]:
    ids: list[int] = []
    while len(ids) < length:
        ids += model.tokenizer.encode(TEXT, special=False)
    return ids[:length]


def run_blockmem(engine: blockmem.Engine, ids: list[int], new_tokens: int) -> tuple[float, float]:
    out = engine.generate(prompt_ids=ids, max_new_tokens=new_tokens, ignore_eos=True)
    return out.stats.prefill_tokens_per_second, out.stats.decode_tokens_per_second


@torch.inference_mode()
def run_transformers(model: torch.nn.Module, ids: list[int], new_tokens: int) -> tuple[float, float]:
    from transformers import DynamicCache

    prompt = torch.tensor([ids])
    cache = DynamicCache()
    start = time.perf_counter()
    out = model(prompt, **cache_kwargs(model, cache), use_cache=True, logits_to_keep=1)
    token = out.logits[:, -1:].argmax(-1)
    prefill = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(new_tokens - 1):
        out = model(token, **cache_kwargs(model, cache), use_cache=True)
        token = out.logits[:, -1:].argmax(-1)
    decode = time.perf_counter() - start
    return len(ids) / prefill, (new_tokens - 1) / decode


def machine() -> dict[str, str]:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else ""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent).stdout.strip()
    except OSError:
        commit = "?"
    import transformers

    return {"cpu": cpu, "cores": str(torch.get_num_threads()), "python": platform.python_version(),
            "torch": torch.__version__, "transformers": transformers.__version__, "commit": commit}


def summarize(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m", help="catalog name or .gguf path")
    parser.add_argument("--lengths", default="1024,4096,8160", help="prompt lengths in tokens")
    parser.add_argument("--new-tokens", type=int, default=32, help="tokens generated per run")
    parser.add_argument("--reps", type=int, default=3, help="timed repetitions per system and length")
    parser.add_argument("--threads", type=int, default=2, help="torch threads for both systems")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "int4"],
                        help="weights and activations, for both systems (int4: blockmem only, transformers float32)")
    parser.add_argument("--out", type=Path, help="write results as JSON here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM

    model = blockmem.load(args.model, device="cpu", dtype=args.dtype)
    ref_dtype = torch.float32 if args.dtype == "int4" else getattr(torch, args.dtype)
    engine = blockmem.Engine(model)
    ref = AutoModelForCausalLM.from_pretrained(str(model.path.parent), gguf_file=model.path.name,
                                               dtype=ref_dtype, attn_implementation="sdpa").eval()
    lengths = [int(x) for x in args.lengths.split(",")]
    results = []
    for length in lengths:
        ids = prompt_ids(model, length)
        run_blockmem(engine, ids[:256], 4), run_transformers(ref, ids[:256], 4)  # warm-up
        runs: dict[str, list[tuple[float, float]]] = {"blockmem": [], "transformers": []}
        for rep in range(args.reps):
            runs["blockmem"].append(run_blockmem(engine, ids, args.new_tokens))
            runs["transformers"].append(run_transformers(ref, ids, args.new_tokens))
            print(f"  {length} tokens, rep {rep + 1}/{args.reps}: blockmem {runs['blockmem'][-1]}, "
                  f"transformers {runs['transformers'][-1]}", file=sys.stderr)
        row = {"length": length}
        for system, values in runs.items():
            row[system] = {"prefill_tok_s": summarize([p for p, _ in values]),
                           "decode_tok_s": summarize([d for _, d in values])}
        row["prefill_ratio"] = row["blockmem"]["prefill_tok_s"]["median"] / row["transformers"]["prefill_tok_s"]["median"]
        row["decode_ratio"] = row["blockmem"]["decode_tok_s"]["median"] / row["transformers"]["decode_tok_s"]["median"]
        results.append(row)
    report = {"machine": machine(), "model": args.model, "dtype": args.dtype,
              "transformers_dtype": str(ref_dtype).removeprefix("torch."), "threads": args.threads, "reps": args.reps,
              "new_tokens": args.new_tokens, "peak_rss_bytes": peak_rss_bytes(), "results": results}
    print_table(report)
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")


def print_table(report: dict) -> None:
    def cell(stat: dict[str, float]) -> str:
        return f"{stat['median']:.1f} ({stat['min']:.1f}-{stat['max']:.1f})"

    print(f"\n{report['model']} blockmem {report['dtype']} vs transformers {report.get('transformers_dtype', report['dtype'])}, {report['threads']} threads, median of {report['reps']} (min-max), "
          f"{report['new_tokens']} new tokens; {report['machine']}")
    print("| prompt tokens | blockmem prefill tok/s | transformers prefill tok/s | ratio | "
          "blockmem decode tok/s | transformers decode tok/s | ratio |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for row in report["results"]:
        b, t = row["blockmem"], row["transformers"]
        print(f"| {row['length']} | {cell(b['prefill_tok_s'])} | {cell(t['prefill_tok_s'])} | "
              f"{row['prefill_ratio']:.2f}x | {cell(b['decode_tok_s'])} | {cell(t['decode_tok_s'])} | "
              f"{row['decode_ratio']:.2f}x |")


if __name__ == "__main__":
    run_script(main)
