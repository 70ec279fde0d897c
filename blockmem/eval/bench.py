"""`blockmem bench`: speed and memory by context length, blockmem methods against peers.

Every (system, length, repetition) is measured in a fresh process (`python -m blockmem.eval.bench`
with the job on stdin), so peak RSS is that run's own, and the systems alternate within each
repetition so that drift on a noisy machine hits all of them. All systems read the same prompt
token ids (the length minus --new-tokens, so that "8k" fits an 8K window) and decode exactly
--new-tokens tokens greedily (EOS ignored) with the same thread count. transformers computes in
float32 on the GGUF's dequantized weights, as blockmem does; llama.cpp on the quantized blocks.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from blockmem.eval.runner import results_file
from blockmem.eval.systems import (SystemSpec, blockmem_engine, cache_kwargs, load_transformers, open_llama,
                                   reads_every_key, worker_failure)

TEXT = ("The library opens at nine. Readers come for newspapers, students for quiet tables, and the old "
        "men for the chess boards by the window. In the afternoon the light moves across the shelves. ")


@dataclass
class BenchPlan:
    model: str | None
    lengths: list[int]
    systems: list[SystemSpec]
    reps: int
    new_tokens: int
    out: Path
    dtype: str = "float32"
    device: str = "cpu"
    threads: int | None = None
    ram_budget: str | None = None  # memory tiers for block-memory methods (bytes moved per token)


def run_bench(plan: BenchPlan, on_start: Callable[[str], None] | None = None,
              on_record: Callable[[dict[str, Any]], None] | None = None) -> str:
    """Measure everything in the plan, appending records to plan.out; returns the run id."""
    from blockmem.model.loader import resolve

    run_id = uuid.uuid4().hex[:12]
    name = resolve(plan.model)[0]
    stopped: set[tuple[str, int]] = set()  # refused or failed: not repeated
    with results_file(plan.out) as append:
        for length in plan.lengths:
            for rep in range(plan.reps):
                for system in plan.systems:
                    if (system.label, length) in stopped:
                        continue
                    if on_start:
                        on_start(f"{system.label} @ {length} tokens, rep {rep + 1}/{plan.reps}")
                    job = {"system": asdict(system), "model": plan.model, "length": length,
                           "new_tokens": plan.new_tokens, "dtype": plan.dtype, "device": plan.device,
                           "threads": plan.threads, "ram_budget": plan.ram_budget}
                    done = subprocess.run([sys.executable, "-m", "blockmem.eval.bench"], input=json.dumps(job),
                                          capture_output=True, text=True)
                    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
                    if done.returncode == 0 and lines:
                        measured = json.loads(lines[-1])
                    else:
                        tail = done.stderr.strip().splitlines()
                        last = tail[-1] if tail else None
                        measured = {"error": worker_failure(system.kind, done.returncode, last)
                                    if done.returncode else last or "the worker wrote no result"}
                    if "refused" in measured or "error" in measured:
                        stopped.add((system.label, length))
                    record = {"bench": True, "run": run_id, "system": system.label, "kind": system.kind,
                              "model": name, "length": length, "rep": rep, "new_tokens": plan.new_tokens,
                              "threads": plan.threads, "ram_budget": plan.ram_budget, **measured, "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
                    append(record)
                    if on_record:
                        on_record(record)
    return run_id


def prompt_ids(tokenizer: Any, length: int) -> list[int]:
    ids: list[int] = []
    while len(ids) < length:
        ids += tokenizer.encode(TEXT, special=False)
    return ids[:length]


def measure(job: dict[str, Any]) -> dict[str, Any]:
    """One measurement in this process."""
    import torch

    import blockmem
    from blockmem.engine.stats import peak_rss_bytes
    from blockmem.errors import ContextLengthError
    from blockmem.model.loader import load_tokenizer, resolve

    if job.get("threads"):
        torch.set_num_threads(job["threads"])
    spec = SystemSpec(**job["system"])
    length, new_tokens = job["length"], job["new_tokens"]
    if spec.is_peer:  # only the tokenizer from blockmem: the peer's RSS stays its own
        path = resolve(job["model"])[1]
        ids = prompt_ids(load_tokenizer(job["model"]), length - new_tokens)
        timing = _transformers(path, ids, new_tokens) if spec.kind == "transformers" else \
            _llamacpp(path, ids, new_tokens, job.get("threads"), spec.method == "fa")
        return {**timing, "tokens_attended": reads_every_key(len(ids), new_tokens - 1),
                "peak_rss_mib": round(peak_rss_bytes() / 2**20, 1)}
    model = blockmem.load(job["model"], dtype=spec.dtype or job["dtype"], device=job["device"])
    ids = prompt_ids(model.tokenizer, length - new_tokens)
    engine = blockmem_engine(spec, model, ram_budget=job.get("ram_budget"))
    try:
        out = engine.generate(prompt_ids=ids, max_new_tokens=new_tokens, ignore_eos=True)
    except ContextLengthError as exc:
        return {"refused": exc.problem}
    decode = out.method.get("telemetry", {}).get("decode") or {}
    return {"prefill_tok_s": round(out.stats.prefill_tokens_per_second, 2), "ttft": round(out.stats.time_to_first_token, 3),
            "decode_tok_s": round(out.stats.decode_tokens_per_second, 2),
            "peak_rss_mib": round(out.stats.peak_rss_bytes / 2**20, 1),
            "tokens_attended": decode.get("tokens_attended", reads_every_key(len(ids), out.stats.decode_steps)),
            "bytes_moved_per_token": out.stats.bytes_moved_per_token}


def _transformers(path: Path, ids: list[int], new_tokens: int) -> dict[str, float]:
    import torch
    from transformers import DynamicCache

    ref = load_transformers(path)
    with torch.inference_mode():
        cache = DynamicCache()
        started = time.perf_counter()
        out = ref(torch.tensor([ids]), **cache_kwargs(ref, cache), use_cache=True, logits_to_keep=1)
        prefill = time.perf_counter() - started
        token = out.logits[:, -1:].argmax(-1)
        ttft = time.perf_counter() - started
        started = time.perf_counter()
        for _ in range(new_tokens - 1):
            token = ref(token, **cache_kwargs(ref, cache), use_cache=True).logits[:, -1:].argmax(-1)
        decode = time.perf_counter() - started
    return {"prefill_tok_s": round(len(ids) / prefill, 2), "ttft": round(ttft, 3),
            "decode_tok_s": round((new_tokens - 1) / decode, 2)}


def _llamacpp(path: Path, ids: list[int], new_tokens: int, threads: int | None, flash_attn: bool) -> dict[str, float]:
    llm = open_llama(path, len(ids) + new_tokens + 16, threads, flash_attn)
    started = time.perf_counter()
    llm.eval(ids)
    prefill = time.perf_counter() - started
    token = llm.sample(temp=0.0)
    ttft = time.perf_counter() - started
    started = time.perf_counter()
    for _ in range(new_tokens - 1):
        llm.eval([token])
        token = llm.sample(temp=0.0)
    decode = time.perf_counter() - started
    return {"prefill_tok_s": round(len(ids) / prefill, 2), "ttft": round(ttft, 3),
            "decode_tok_s": round((new_tokens - 1) / decode, 2)}


def main() -> None:
    from blockmem.errors import BlockmemError

    try:
        print(json.dumps(measure(json.loads(sys.stdin.read()))), flush=True)
    except BlockmemError as exc:
        print(json.dumps({"error": exc.problem}), flush=True)
    except ImportError as exc:
        print(json.dumps({"error": f"{exc.name or exc} is not installed (pip install \"blockmem[peers]\")"}),
              flush=True)


if __name__ == "__main__":
    main()
