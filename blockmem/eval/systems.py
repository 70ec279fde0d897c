"""The systems an evaluation compares: blockmem methods and peers, all answering the same token ids.

A system is named by a spec string:

- a blockmem method with optional options and dtype: `dense`, `infllm`, `infllm:topk=8,n_local=1024`,
  `infllm@bfloat16`, `infllm@int4` (4-bit weights for decode);
- `transformers`: Hugging Face transformers, dense SDPA attention, float32, on the same weights
  (the same GGUF, dequantized by transformers; needs `transformers` and `accelerate`);
- `llamacpp`: llama.cpp through `llama-cpp-python` on the same GGUF (computes on the quantized
  weights); `llamacpp:fa` with its flash attention on;
- `kvpress:PRESS@RATIO`: a kvpress press (streaming, snapkv, knorm, expected_attention, tova,
  random) compressing the context by RATIO (the share of KV dropped) during prefill, on the
  transformers model; `kvpress` alone means streaming, snapkv and knorm. kvpress runs in whatever
  Python `--kvpress-python` names (its own environment: it pins an older transformers).

Every peer decodes greedily, stops at EOS, the sample's stop strings or its token limit, and its
answer is detokenized by blockmem's tokenizer, so only the attention computation differs.
"""

from __future__ import annotations

import functools
import inspect
import json
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from blockmem.engine.generate import next_token_losses
from blockmem.engine.stats import peak_rss_bytes
from blockmem.engine.stops import StopMatcher
from blockmem.errors import ConfigError
from blockmem.eval.tasks import Sample
from blockmem.model.tokenizer import StreamDecoder, Tokenizer

PEERS = ("transformers", "llamacpp", "kvpress")
DEFAULT_PRESSES = ("streaming", "snapkv", "knorm")
KVPRESS_PRESSES = ("streaming", "snapkv", "knorm", "expected_attention", "tova", "random")


@dataclass(frozen=True)
class SystemSpec:
    label: str  # as written in results: "infllm:topk=8", "llamacpp", "kvpress:snapkv@0.5"
    kind: str  # blockmem | transformers | llamacpp | kvpress
    method: str = ""  # blockmem method name or kvpress press name
    options: dict[str, Any] = field(default_factory=dict)
    ratio: float = 0.0  # kvpress compression ratio
    dtype: str | None = None  # blockmem compute dtype for this system (`infllm@bfloat16`); default: the run's

    @property
    def is_peer(self) -> bool:
        return self.kind != "blockmem"


def parse_method(spec: str) -> tuple[str, dict[str, Any]]:
    """'infllm:topk=8,n_local=1024' -> ('infllm', {'topk': 8, 'n_local': 1024})."""
    name, _, rest = spec.partition(":")
    options: dict[str, Any] = {}
    for item in filter(None, rest.split(",")):
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"method option {item!r} in {spec!r} has no value", "write options as name=value")
        try:
            options[key] = json.loads(value)
        except ValueError:
            options[key] = value
    return name, options


def split_methods(text: str) -> list[str]:
    """'dense,infllm:topk=8,n_local=64,streaming' -> ['dense', 'infllm:topk=8,n_local=64', 'streaming']: an
    item with '=' but no ':' continues the options of the method before it (';' also separates)."""
    specs: list[str] = []
    for item in (part.strip() for part in text.replace(";", ",;,").split(",")):
        if not item or item == ";":
            if item == ";":
                specs.append("")
            continue
        if "=" in item and ":" not in item and specs and specs[-1]:
            specs[-1] += "," + item
        else:
            specs.append(item)
    return [spec for spec in specs if spec]


def parse_systems(methods: str | None, peers: str | None, kv_ratio: float = 0.5) -> list[SystemSpec]:
    """blockmem methods (see split_methods) and peers."""
    from blockmem.attention import create_method

    if not 0.0 < kv_ratio < 1.0:
        raise ConfigError(f"--kv-ratio must be between 0 and 1 (the share of the KV cache kvpress drops), got "
                          f"{kv_ratio}")
    systems: list[SystemSpec] = []
    for spec in split_methods(methods or ""):
        method, _, dtype = spec.partition("@")
        name, options = parse_method(method)
        try:
            create_method(name, **options)  # validates the name and options now, not in a worker
        except (TypeError, ValueError) as exc:  # a value of the wrong type, e.g. topk=abc
            raise ConfigError(f"the options of {method!r} are not valid ({exc})",
                              "write numbers as numbers, e.g. infllm:topk=8,n_local=1024") from None
        if dtype:
            from blockmem.model.loader import parse_precision

            parse_precision(dtype)
        systems.append(SystemSpec(spec, "blockmem", name, options, dtype=dtype or None))
    for spec in filter(None, (p.strip() for p in (peers or "").split(","))):
        kind, _, rest = spec.partition(":")
        if kind not in PEERS:
            raise ConfigError(f"unknown peer {kind!r}", f"choose from: {', '.join(PEERS)}")
        if kind == "llamacpp" and rest in ("", "fa"):
            systems.append(SystemSpec(spec, kind, rest))  # llamacpp:fa turns on llama.cpp's flash attention
            continue
        if kind != "kvpress":
            if rest:
                raise ConfigError(f"the {kind} peer takes no variant, got {spec!r}",
                                  "peers: transformers, llamacpp, llamacpp:fa, kvpress, kvpress:PRESS@RATIO")
            systems.append(SystemSpec(kind, kind))
            continue
        for press in [rest] if rest else DEFAULT_PRESSES:
            press, _, ratio_text = press.partition("@")
            if press not in KVPRESS_PRESSES:
                raise ConfigError(f"unknown kvpress press {press!r}", f"choose from: {', '.join(KVPRESS_PRESSES)}")
            ratio = float(ratio_text) if ratio_text else kv_ratio
            systems.append(SystemSpec(f"kvpress:{press}@{ratio:g}", "kvpress", press, ratio=ratio))
    if not systems:
        raise ConfigError("nothing to evaluate", "name --methods and/or --peers")
    labels = [s.label for s in systems]
    if len(set(labels)) != len(labels):
        raise ConfigError(f"a system is named twice: {', '.join(labels)}")
    return systems


@dataclass
class Answer:
    text: str
    generated: int
    prompt_tokens: int
    prefill_seconds: float
    ttft: float
    decode_seconds: float
    decode_steps: int
    tokens_attended: float | None = None  # per decode step
    bytes_moved_per_token: int | None = None
    peak_rss_bytes: int = 0
    refused: str | None = None

    def record(self) -> dict[str, Any]:
        if self.refused:
            return {"refused": self.refused, "score": None}
        return {"prediction": self.text, "generated": self.generated, "latency": round(self.ttft + self.decode_seconds, 3),
                "ttft": round(self.ttft, 3), "prefill_tok_s": round(self.prompt_tokens / self.prefill_seconds, 1)
                if self.prefill_seconds else None,
                "decode_tok_s": round(self.decode_steps / self.decode_seconds, 2) if self.decode_steps and
                self.decode_seconds else None,
                "tokens_attended": self.tokens_attended, "bytes_moved_per_token": self.bytes_moved_per_token,
                "peak_rss_mib": round(self.peak_rss_bytes / 2**20, 1)}


def reads_every_key(prompt: int, decode_steps: int) -> float:
    """Mean keys a decode step reads when it reads the whole cache, counted as blockmem's
    telemetry counts them: the step that feeds the j-th generated token reads `prompt + j` keys
    (itself included). With no decode step, the prompt."""
    return prompt + (decode_steps + 1) / 2 if decode_steps else float(prompt)


def greedy(first: int, step: Callable[[int], int], sample: Sample, tokenizer: Tokenizer) -> tuple[list[int], str, int]:
    """Decode from `first` with `step(token) -> next token` until EOS, a stop string or the limit:
    (tokens, text, decode steps). The same rule blockmem's own engine applies."""
    detokenizer, stops = StreamDecoder(tokenizer), StopMatcher(tuple(sample.stop))
    tokens: list[int] = []
    pieces: list[str] = []
    token, steps = first, 0
    while token not in tokenizer.eos_ids:
        tokens.append(token)
        pieces.append(stops.feed(detokenizer.push(token)))
        if stops.stopped or len(tokens) >= sample.max_new_tokens:
            break
        token = step(token)
        steps += 1
    pieces.append(stops.feed(detokenizer.flush()) + stops.flush())
    return tokens, "".join(pieces), steps


class Answerer:
    """Answers samples for one system; built once per worker process."""

    def answer(self, sample: Sample, context: list[int], question: list[int]) -> Answer:
        raise NotImplementedError

    def losses(self, ids: list[int]) -> list[float] | None:
        """Per-token negative log-likelihoods (perplexity task); None when the system cannot."""
        return None

    def close(self) -> None:
        pass


def blockmem_engine(spec: SystemSpec, model: Any, chunk: int = 1024, ram_budget: str | None = None) -> Any:
    """The Engine for a blockmem system; `ram_budget` turns memory tiers on for block-memory methods
    (blocks past the budget spill to disk; bytes moved per token are then recorded)."""
    from blockmem.attention import create_method
    from blockmem.engine import Engine
    from blockmem.memory.tiers import TierConfig, parse_size

    tiers = TierConfig(ram_budget=parse_size(ram_budget, "--ram-budget")) if ram_budget and spec.method != "dense" \
        else None
    return Engine(model, method=create_method(spec.method, **spec.options), prefill_chunk=chunk, tiers=tiers)


class BlockmemAnswerer(Answerer):
    def __init__(self, spec: SystemSpec, model: Any, chunk: int, ram_budget: str | None = None) -> None:
        self.engine = blockmem_engine(spec, model, chunk, ram_budget)

    def answer(self, sample: Sample, context: list[int], question: list[int]) -> Answer:
        from blockmem.errors import ContextLengthError

        ids = context + question
        try:
            out = self.engine.generate(prompt_ids=ids, max_new_tokens=sample.max_new_tokens, stop=list(sample.stop))
        except ContextLengthError as exc:
            return Answer("", 0, len(ids), 0, 0, 0, 0, refused=exc.problem)
        s = out.stats
        decode = out.method.get("telemetry", {}).get("decode") or {}
        read = decode.get("tokens_attended", reads_every_key(len(ids), s.decode_steps))
        return Answer(out.text, len(out.token_ids), len(ids), s.prefill_seconds, s.time_to_first_token,
                      s.decode_seconds, s.decode_steps, read, s.bytes_moved_per_token, peak_rss_bytes())

    def losses(self, ids: list[int]) -> list[float] | None:
        return self.engine.token_losses(ids).tolist()


def load_transformers(path: Path) -> Any:
    """The transformers peer's model: float32, SDPA, from the same GGUF file or HF directory."""
    import torch
    try:
        import transformers
        from transformers import AutoModelForCausalLM
    except ImportError:
        raise ConfigError("the transformers peer needs transformers and accelerate",
                          'pip install "blockmem[peers]"') from None
    transformers.logging.set_verbosity_error()
    kwargs = {"gguf_file": path.name} if path.is_file() else {}
    return AutoModelForCausalLM.from_pretrained(str(path.parent if path.is_file() else path), dtype=torch.float32,
                                                attn_implementation="sdpa", **kwargs).eval()


def cache_kwargs(model: Any, cache: Any) -> dict[str, Any]:
    """The KV cache as `model.forward` wants it: transformers 5.2x renamed `past_key_values` to
    `cache` (the old name warns that it will go); older versions only know `past_key_values`."""
    return {_cache_argument(type(model)): cache}


@functools.lru_cache(maxsize=None)
def _cache_argument(model_class: type) -> str:
    return "cache" if "cache" in inspect.signature(model_class.forward).parameters else "past_key_values"


def open_llama(path: Path, context: int, threads: int | None, flash_attn: bool = False) -> Any:
    """The llama.cpp peer on the same GGUF file, with `context` tokens of KV cache."""
    if path.is_dir() or path.suffix != ".gguf":
        raise ConfigError("the llamacpp peer needs the model as a .gguf file", "pass --model FILE.gguf or a "
                          "packaged model name")
    try:
        from llama_cpp import Llama
    except ImportError:
        raise ConfigError("the llamacpp peer needs llama-cpp-python", 'pip install "blockmem[peers]" (it '
                          "compiles llama.cpp: several minutes)") from None
    import os

    threads = threads or os.cpu_count() or 1
    return Llama(str(path), n_ctx=context, n_threads=threads, n_threads_batch=threads, n_batch=512,
                 flash_attn=flash_attn, verbose=False)


def exit_reason(code: int) -> str:
    """How a process with return code `code` ended: "exit status N", or "killed by SIGNAME" for a
    negative code (subprocess's way of saying a signal killed it)."""
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            pass
    return f"exit status {code}"


def worker_failure(kind: str, code: int, last_line: str | None) -> str:
    """One line for a system's worker process that ended with status `code` (negative: the signal
    that killed it), with the last line it wrote and, for a crash of llama.cpp, the known cause."""
    text = f"the worker failed ({exit_reason(code)})" + (f": {last_line}" if last_line else "")
    if kind == "llamacpp" and -code in (signal.SIGSEGV, signal.SIGILL):
        text += ("; llama.cpp crashed: its AMX kernels do on some Intel CPUs (llama.cpp issue 20824); on a CPU "
                 "with AMX, rebuild llama-cpp-python without them as docs/eval.md#peers says")
    return text


class TransformersAnswerer(Answerer):
    def __init__(self, path: Path, tokenizer: Tokenizer) -> None:
        self.model = load_transformers(path)
        self.tokenizer = tokenizer

    def answer(self, sample: Sample, context: list[int], question: list[int]) -> Answer:
        import torch
        from transformers import DynamicCache

        ids = context + question
        with torch.inference_mode():
            cache = DynamicCache()
            started = time.perf_counter()
            logits = self.model(torch.tensor([ids]), **cache_kwargs(self.model, cache), logits_to_keep=1).logits
            prefill = time.perf_counter() - started
            first = int(logits[0, -1].argmax())
            ttft = time.perf_counter() - started

            def step(token: int) -> int:
                return int(self.model(torch.tensor([[token]]), **cache_kwargs(self.model, cache)).logits[0, -1].argmax())

            tokens, text, steps = greedy(first, step, sample, self.tokenizer)
            decode = time.perf_counter() - started - ttft
        return Answer(text, len(tokens), len(ids), prefill, ttft, decode, steps, reads_every_key(len(ids), steps),
                      None, peak_rss_bytes())

    def losses(self, ids: list[int]) -> list[float] | None:
        import torch
        from transformers import DynamicCache

        out: list[float] = []
        with torch.inference_mode():
            cache = DynamicCache()
            for start in range(0, len(ids), 1024):
                chunk = ids[start:start + 1024]
                logits = self.model(torch.tensor([chunk]), **cache_kwargs(self.model, cache)).logits[0]
                out += next_token_losses(logits, ids, start).tolist()
        return out


class LlamaCppAnswerer(Answerer):
    def __init__(self, path: Path, tokenizer: Tokenizer, context: int, threads: int | None,
                 flash_attn: bool = False) -> None:
        self.llm = open_llama(path, context, threads, flash_attn)
        self.tokenizer = tokenizer

    def answer(self, sample: Sample, context: list[int], question: list[int]) -> Answer:
        ids = context + question
        self.llm.reset()
        started = time.perf_counter()
        self.llm.eval(ids)
        prefill = time.perf_counter() - started
        first = int(self.llm.sample(temp=0.0))
        ttft = time.perf_counter() - started

        def step(token: int) -> int:
            self.llm.eval([token])
            return int(self.llm.sample(temp=0.0))

        tokens, text, steps = greedy(first, step, sample, self.tokenizer)
        decode = time.perf_counter() - started - ttft
        return Answer(text, len(tokens), len(ids), prefill, ttft, decode, steps, reads_every_key(len(ids), steps),
                      None, peak_rss_bytes())

    def close(self) -> None:
        self.llm.close() if hasattr(self.llm, "close") else None


class KvpressAnswerer(Answerer):
    """Talks to blockmem/eval/kvpress_worker.py running under `python` (kvpress's environment)."""

    def __init__(self, spec: SystemSpec, path: Path, tokenizer: Tokenizer, python: str | None,
                 threads: int | None, log: Path | None) -> None:
        python = python or sys.executable
        self.tokenizer = tokenizer
        worker = Path(__file__).with_name("kvpress_worker.py")
        stderr = open(log, "ab") if log else subprocess.DEVNULL  # noqa: SIM115 (closed in close())
        try:
            self.process = subprocess.Popen([python, str(worker)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                            stderr=stderr, text=True)
        except OSError as exc:
            raise ConfigError(f"cannot start the kvpress peer with {python}: {exc}",
                              "pass --kvpress-python PATH to a Python that has kvpress (docs/eval.md#peers)") from None
        self._stderr = stderr
        ready = self._call({"model": str(path), "press": spec.method, "ratio": spec.ratio, "threads": threads})
        if not ready.get("ready"):
            raise ConfigError("the kvpress peer did not start")

    def _call(self, message: dict[str, Any]) -> dict[str, Any]:
        assert self.process.stdin is not None and self.process.stdout is not None
        try:
            self.process.stdin.write(json.dumps(message) + "\n")
            self.process.stdin.flush()
        except BrokenPipeError:
            pass
        line = self.process.stdout.readline()
        if not line:
            code = self.process.wait()
            if code < 0:
                raise ConfigError(f"the kvpress peer was {exit_reason(code)} while it worked",
                                  "see its log beside the results file; SIGKILL is often the system running "
                                  "out of memory: run fewer --jobs or shorter --lengths")
            raise ConfigError(f"the kvpress peer stopped ({exit_reason(code)}); is kvpress "
                              "installed in that Python?", "pass --kvpress-python PATH to a Python with kvpress "
                              "installed (docs/eval.md#peers); its log is beside the results file")
        return json.loads(line)

    def answer(self, sample: Sample, context: list[int], question: list[int]) -> Answer:
        reply = self._call({"context": context, "question": question, "max_new_tokens": sample.max_new_tokens,
                            "eos": sorted(self.tokenizer.eos_ids)})
        produced = iter(reply["tokens"][1:])
        tokens, text, _ = greedy(reply["tokens"][0], lambda _: next(produced, -1), sample, self.tokenizer) \
            if reply["tokens"] else ([], "", 0)
        ran = max(0, len(reply["tokens"]) - 1)  # the worker's decode steps (it stops at EOS, not at stop strings)
        return Answer(text, len(tokens), len(context) + len(question), reply["prefill_seconds"], reply["ttft"],
                      reply["decode_seconds"], ran, reads_every_key(reply["kept"] + len(question), ran), None,
                      reply["peak_rss_bytes"])

    def close(self) -> None:
        if self.process.stdin:
            self.process.stdin.close()
        self.process.wait(timeout=60)
        if self._stderr is not subprocess.DEVNULL:
            self._stderr.close()
