"""One evaluation worker: a process that loads one system once and answers every pending sample of
one context length, printing one JSON record per sample on stdout.

The runner (blockmem.eval.runner) starts one worker per (system, length), so each record's peak
RSS belongs to that system at that length alone, peers never share a process with blockmem's
model, and a crash loses only the sample in flight. Run as `python -m blockmem.eval.worker` with
the job as JSON on stdin.
"""

from __future__ import annotations

import json
import math
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

from blockmem.eval.systems import (Answerer, BlockmemAnswerer, KvpressAnswerer, LlamaCppAnswerer, SystemSpec,
                                   TransformersAnswerer)
from blockmem.eval.tasks import PERPLEXITY, TaskOptions, make_sample


def build(job: dict[str, Any], spec: SystemSpec) -> tuple[Answerer, Any]:
    """The system's answerer and the tokenizer that sizes the prompts."""
    import blockmem
    from blockmem.model.loader import load_tokenizer, resolve

    if spec.kind == "blockmem":
        model = blockmem.load(job["model"], dtype=spec.dtype or job["dtype"], device=job["device"])
        return BlockmemAnswerer(spec, model, job["chunk"], job.get("ram_budget")), model.tokenizer
    path = resolve(job["model"])[1]
    tokenizer = load_tokenizer(job["model"])  # only the tokenizer: the peer's RSS stays its own
    if spec.kind == "transformers":
        return TransformersAnswerer(path, tokenizer), tokenizer
    if spec.kind == "llamacpp":
        return LlamaCppAnswerer(path, tokenizer, job["length"] + 64, job["threads"], spec.method == "fa"), tokenizer
    return KvpressAnswerer(spec, path, tokenizer, job.get("kvpress_python"), job["threads"],
                           Path(job["log"]) if job.get("log") else None), tokenizer


def exit_with_parent(interval: float = 2.0) -> None:
    """Stop this process when the runner that started it is gone. A runner stopped by Ctrl-C kills
    its worker itself, but one killed outright (SIGTERM, SIGKILL, a closed terminal) cannot, and
    the worker would go on answering samples nobody will record, holding a core for minutes."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(interval)
        os._exit(1)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def run(job: dict[str, Any]) -> None:
    import torch

    if job.get("threads"):
        torch.set_num_threads(job["threads"])
    spec = SystemSpec(**job["system"])
    options = TaskOptions(**job["task_options"])
    answerer, tokenizer = build(job, spec)
    base = {"system": spec.label, "kind": spec.kind, "model": job["model_name"], "seed": job["seed"],
            "length": job["length"]}
    try:
        for task, index in job["work"]:
            record: dict[str, Any] = {"task": task, **base, "index": index}
            if task == PERPLEXITY:
                record.update(_perplexity(answerer, tokenizer, job["length"], index, job["seed"]))
            else:
                sample = make_sample(task, tokenizer, job["length"], index, job["seed"], options)
                context, question = sample.prompt_ids(tokenizer)
                answer = answerer.answer(sample, context, question)
                record.update(depth=sample.depth, tokens=len(context) + len(question), metric=sample.metric,
                              references=list(sample.references), **answer.record())
                if not answer.refused:
                    record["score"] = sample.score(answer.text)
            record["time"] = time.strftime("%Y-%m-%dT%H:%M:%S")
            print(json.dumps(record), flush=True)
    finally:
        answerer.close()


def _perplexity(answerer: Answerer, tokenizer: Any, length: int, index: int, seed: int) -> dict[str, Any]:
    from blockmem.errors import ContextLengthError
    from blockmem.eval.perplexity import by_bucket, text_ids

    ids = text_ids(tokenizer, length, index, seed)
    started = time.perf_counter()
    try:
        losses = answerer.losses(ids)
    except ContextLengthError as exc:
        return {"refused": exc.problem, "score": None}
    if losses is None:
        return {"unsupported": "this system does not report per-token losses", "score": None}
    mean = sum(losses) / len(losses)
    return {"tokens": len(ids), "score": None, "loss": round(mean, 4), "ppl": round(math.exp(mean), 3),
            "buckets": by_bucket(losses, len(ids)), "latency": round(time.perf_counter() - started, 3)}


def main() -> None:
    from blockmem.errors import BlockmemError

    exit_with_parent()
    try:
        run(json.loads(sys.stdin.read()))
    except BlockmemError as exc:  # a problem the user can fix: one line for the runner to show
        print(json.dumps({"error": exc.problem, "fix": exc.fix}), flush=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
