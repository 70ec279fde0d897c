"""Long-context speed: block-memory methods vs blockmem dense vs transformers vs llama.cpp.

    python benchmarks/bench_long.py --lengths 8k,16k,32k --systems infllm,blocksparse,dense,transformers,llamacpp

Every (system, length) runs in its own process, so peak RSS is that run's own; the systems
alternate within each repetition so drift hits all of them. All load the same GGUF
(SmolLM2-135M-Instruct Q4_1 by default; llama.cpp computes with it directly, the others on its
float32 dequantization), feed the same prompt tokens (the length minus --new-tokens, so that "8k"
fits an 8K window) and decode --new-tokens greedily with the same thread count.

A blockmem system may name its dtype, `infllm@bfloat16` (default float32; transformers computes in
float32, llama.cpp on the quantized blocks); `llamacpp@fa` turns on llama.cpp's flash attention.
blockmem dense refuses prompts past the model's window and is reported as such. llama.cpp needs
`pip install llama-cpp-python` (it compiles; allow several minutes).

Prints medians (min-max) with ratios against --baseline and writes every run as JSON with --out;
`--report A.json B.json` prints one table from earlier runs.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

TEXT = ("The library opens at nine. Readers come for newspapers, students for quiet tables, and the old "
        "men for the chess boards by the window. In the afternoon the light moves across the shelves. ")


def _prompt(tokenizer: Any, length: int) -> list[int]:
    ids: list[int] = []
    while len(ids) < length:
        ids += tokenizer.encode(TEXT, special=False)
    return ids[:length]


def _rss() -> int:
    from blockmem.engine.stats import peak_rss_bytes

    return peak_rss_bytes()


def single(system: str, length: int, new_tokens: int, threads: int, model_name: str) -> dict[str, Any]:
    """One measurement in this process."""
    import torch

    import blockmem
    from blockmem.errors import ContextLengthError

    torch.set_num_threads(threads)
    system, _, variant = system.partition("@")
    if system in ("transformers", "llamacpp"):  # only the tokenizer from blockmem: RSS stays the peer's own
        from blockmem.model.loader import load_tokenizer, resolve

        path = resolve(model_name)[1]
        ids = _prompt(load_tokenizer(path), length - new_tokens)
        if system == "transformers":
            prefill, decode = _transformers(path, ids, new_tokens)
        else:
            prefill, decode = _llamacpp(path, ids, new_tokens, threads, flash_attn=variant == "fa")
        return {"prefill_tok_s": prefill, "decode_tok_s": decode, "peak_rss_mib": _rss() / 2**20}
    model = blockmem.load(model_name, device="cpu", dtype=variant or "float32")
    ids = _prompt(model.tokenizer, length - new_tokens)
    engine = blockmem.Engine(model, method=blockmem.create_method(system))
    try:
        out = engine.generate(prompt_ids=ids, max_new_tokens=new_tokens, ignore_eos=True)
    except ContextLengthError as exc:
        return {"refused": exc.problem}
    return {"prefill_tok_s": out.stats.prefill_tokens_per_second, "decode_tok_s": out.stats.decode_tokens_per_second,
            "peak_rss_mib": out.stats.peak_rss_bytes / 2**20,
            "tokens_read": out.method.get("telemetry", {}).get("decode", {}).get("tokens_attended")}


def _transformers(path: Path, ids: list[int], new_tokens: int) -> tuple[float, float]:
    import torch
    from transformers import AutoModelForCausalLM, DynamicCache

    ref = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                               dtype=torch.float32, attn_implementation="sdpa").eval()
    with torch.inference_mode():
        cache = DynamicCache()
        started = time.perf_counter()
        out = ref(torch.tensor([ids]), past_key_values=cache, use_cache=True, logits_to_keep=1)
        prefill = time.perf_counter() - started
        token = out.logits[:, -1:].argmax(-1)
        started = time.perf_counter()
        for _ in range(new_tokens - 1):
            token = ref(token, past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1)
        decode = time.perf_counter() - started
    return len(ids) / prefill, (new_tokens - 1) / decode


def _llamacpp(path: Path, ids: list[int], new_tokens: int, threads: int, flash_attn: bool) -> tuple[float, float]:
    from llama_cpp import Llama

    llm = Llama(str(path), n_ctx=len(ids) + new_tokens + 16, n_threads=threads, n_threads_batch=threads,
                n_batch=512, flash_attn=flash_attn, verbose=False)
    started = time.perf_counter()
    llm.eval(ids)
    prefill = time.perf_counter() - started
    started = time.perf_counter()
    for _ in range(new_tokens - 1):
        token = llm.sample(temp=0.0)
        llm.eval([token])
    decode = time.perf_counter() - started
    return len(ids) / prefill, (new_tokens - 1) / decode


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m", help="short name or .gguf path (llama.cpp needs a GGUF)")
    parser.add_argument("--lengths", default="8k,16k,32k", help="prompt lengths in model tokens")
    parser.add_argument("--systems", default="infllm,blocksparse,dense,transformers,llamacpp",
                        help="blockmem methods (optionally @bfloat16), transformers, llamacpp (optionally @fa)")
    parser.add_argument("--baseline", default="llamacpp", help="ratios are against this system")
    parser.add_argument("--new-tokens", type=int, default=32, help="tokens decoded per run")
    parser.add_argument("--reps", type=int, default=3, help="repetitions; medians are reported")
    parser.add_argument("--threads", type=int, default=2, help="threads for every system")
    parser.add_argument("--out", type=Path, help="write all runs as JSON here")
    parser.add_argument("--report", type=Path, nargs="+", help="print the table of earlier --out files and exit")
    parser.add_argument("--single", nargs=2, metavar=("SYSTEM", "LENGTH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    from blockmem.eval.passkey import parse_length

    if args.report:
        results, systems = _load(args.report)
        print(_report(results, systems, args.baseline))
        return
    if args.single:
        print(json.dumps(single(args.single[0], int(args.single[1]), args.new_tokens, args.threads, args.model)))
        return
    systems = args.systems.split(",")
    results: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for length in [parse_length(x) for x in args.lengths.split(",")]:
        for rep in range(args.reps):
            for system in systems:
                if any("refused" in r or "error" in r for r in results.get((system, length), [])):
                    continue
                command = [sys.executable, __file__, "--single", system, str(length), "--model", args.model,
                           "--new-tokens", str(args.new_tokens), "--threads", str(args.threads)]
                done = subprocess.run(command, capture_output=True, text=True)
                record = json.loads(done.stdout.strip().splitlines()[-1]) if done.returncode == 0 else \
                    {"error": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "failed"}
                results.setdefault((system, length), []).append(record)
                print(f"{system} {length} rep {rep + 1}: {record}", file=sys.stderr, flush=True)
    print(_report(results, systems, args.baseline))
    if args.out:
        records = [{"system": s, "length": n, **r} for (s, n), runs in results.items() for r in runs]
        args.out.write_text(json.dumps(records, indent=1) + "\n")


def _report(results: dict[tuple[str, int], list[dict[str, Any]]], systems: list[str], baseline: str) -> str:
    def values(system: str, length: int, key: str) -> list[float]:
        return [r[key] for r in results.get((system, length), []) if key in r]

    def cell(system: str, length: int, key: str) -> tuple[str, float | None]:
        found = values(system, length, key)
        if not found:
            return "–", None
        middle = statistics.median(found)
        spread = f" ({min(found):.1f}-{max(found):.1f})" if len(found) > 1 else ""
        return f"{middle:.1f}{spread}", middle

    def ratio(value: float | None, base: float | None) -> str:
        return f"{value / base:.2f}x" if value and base else "–"

    lines = [f"| system | length | runs | prefill tok/s | prefill vs {baseline} | decode tok/s | decode vs {baseline} "
             "| peak RSS MiB |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for length in sorted({n for _, n in results}):
        base_prefill = cell(baseline, length, "prefill_tok_s")[1]
        base_decode = cell(baseline, length, "decode_tok_s")[1]
        for system in systems:
            records = results.get((system, length), [])
            if not records:
                continue
            if any("refused" in r for r in records):
                lines.append(f"| {system} | {length // 1024}K | – | refused | | refused | | |")
                continue
            if any("error" in r for r in records):
                lines.append(f"| {system} | {length // 1024}K | – | error: {records[0]['error'][:60]} | | | | |")
                continue
            prefill, prefill_mid = cell(system, length, "prefill_tok_s")
            decode, decode_mid = cell(system, length, "decode_tok_s")
            rss = cell(system, length, "peak_rss_mib")[1] or 0
            lines.append(f"| {system} | {length // 1024}K | {len(records)} | {prefill} | {ratio(prefill_mid, base_prefill)} "
                         f"| {decode} | {ratio(decode_mid, base_decode)} | {rss:.0f} |")
    return "\n".join(lines)


def _load(paths: list[Path]) -> tuple[dict[tuple[str, int], list[dict[str, Any]]], list[str]]:
    results: dict[tuple[str, int], list[dict[str, Any]]] = {}
    systems: list[str] = []
    for path in paths:
        for record in json.loads(path.read_text()):
            results.setdefault((record["system"], record["length"]), []).append(record)
            if record["system"] not in systems:
                systems.append(record["system"])
    return results, systems


if __name__ == "__main__":
    main()
