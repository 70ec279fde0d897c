"""The generate loop: encode -> chunked prefill -> sample/decode until EOS, a stop string or the
token limit, streaming text as it is produced.

    cache = method.new_cache(...)
    logits = prefill(prompt_ids, cache)            # chunk by chunk, logits of the last token only
    while not done:
        token = sampler(logits); yield text(token)
        logits = decoder([token], cache)
"""

from __future__ import annotations

import time
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from blockmem.attention import AttentionMethod, KVCache, create_method
from blockmem.engine.sampler import Sampler, SamplingParams
from blockmem.engine.stats import Stats, peak_gpu_bytes, peak_rss_bytes
from blockmem.heap import trim_heap
from blockmem.engine.stops import StopMatcher
from blockmem.errors import ConfigError, ContextLengthError
from blockmem.memory.tiers import TierConfig
from blockmem.model.decoder import Logits
from blockmem.model.loader import Model
from blockmem.model.tokenizer import StreamDecoder

ProgressFn = Callable[[int, int], None]  # (tokens prefilled so far, total)
Messages = list[dict[str, str]]


def next_token_losses(logits: torch.Tensor, ids: list[int], start: int) -> torch.Tensor:
    """Negative log-likelihoods of ids[start + 1 : start + n + 1], given the logits [n, vocab]
    computed at ids[start : start + n] (the last position has no target inside `ids`)."""
    targets = torch.tensor(ids[start + 1:start + logits.shape[0] + 1], device=logits.device)
    logp = torch.log_softmax(logits[:len(targets)].float(), dim=-1)
    return -logp.gather(1, targets[:, None])[:, 0]


@dataclass
class Completion:
    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" (EOS or stop string) or "length" (token or context limit)
    stats: Stats
    method: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"text": self.text, "finish_reason": self.finish_reason, "tokens": len(self.token_ids),
                "method": self.method, "stats": self.stats.to_dict()}


class Stream:
    """Iterate for text pieces; `completion` is set once the iteration ends."""

    def __init__(self, run: Generator[str, None, Completion]) -> None:
        self._run = run
        self.completion: Completion | None = None

    def __iter__(self) -> Iterator[str]:
        self.completion = yield from self._run


def default_prefill_chunk(tiers: TierConfig | None) -> int:
    """1,024 tokens; 512 under a RAM budget, which halves a chunk's activations (~40 MiB less peak
    RSS for SmolLM2) at the same prefill speed for the block methods (whose attention already goes
    in pieces of 512 queries; measured 33.7-36.1 s vs 34.5-36.0 s for 10K tokens)."""
    return 512 if tiers is not None and tiers.ram_budget is not None else 1024


class Engine:
    def __init__(self, model: Model, method: AttentionMethod | str = "dense", prefill_chunk: int | None = None,
                 tiers: TierConfig | None = None) -> None:
        """`prefill_chunk`: prompt tokens per forward pass (default: `default_prefill_chunk`)."""
        if prefill_chunk is None:
            prefill_chunk = default_prefill_chunk(tiers)
        if prefill_chunk < 1:
            raise ConfigError(f"prefill chunk must be a positive number of tokens, got {prefill_chunk}")
        self.model = model
        self.method = create_method(method) if isinstance(method, str) else method
        self.prefill_chunk = prefill_chunk
        self.tiers = tiers  # budgets for the blocks of block-memory methods (None: all on the device)

    def encode(self, prompt: str | None = None, messages: Messages | None = None, raw: bool = False) -> list[int]:
        """Token ids for a prompt: through the chat template unless `raw` or the model has none."""
        tokenizer = self.model.tokenizer
        if messages is not None:
            return tokenizer.encode_chat(messages)
        if prompt is None:
            raise ConfigError("nothing to generate from: give a prompt or messages")
        if raw or not self.model.has_chat_template:
            return tokenizer.encode(prompt)
        return tokenizer.encode_chat([{"role": "user", "content": prompt}])

    def context_limit(self) -> int | None:
        return self.method.context_limit(self.model.config.max_context)

    def stream(self, prompt: str | None = None, *, messages: Messages | None = None, raw: bool = False,
               prompt_ids: list[int] | None = None, params: SamplingParams | None = None,
               on_prefill: ProgressFn | None = None, **sampling: Any) -> Stream:
        """Generate, yielding text pieces. `sampling` overrides fields of `params`."""
        params = replace(params or SamplingParams(), **sampling)
        ids = prompt_ids if prompt_ids is not None else self.encode(prompt, messages, raw)
        return Stream(self._run(ids, params, on_prefill))

    def generate(self, prompt: str | None = None, *, on_text: Callable[[str], None] | None = None,
                 **kwargs: Any) -> Completion:
        """Generate to the end; `on_text` receives each piece as it is produced."""
        stream = self.stream(prompt, **kwargs)
        for piece in stream:
            if on_text is not None:
                on_text(piece)
        assert stream.completion is not None
        return stream.completion

    def _check_length(self, prompt_tokens: int, answer: bool = True) -> int | None:
        """The method's token limit; refuses a prompt past it, or one that leaves no room for an
        answer token when `answer` (scoring a text needs no room after it)."""
        limit = self.context_limit()
        if prompt_tokens == 0:
            raise ConfigError("the prompt is empty after tokenization")
        if limit is not None and prompt_tokens + answer > limit:
            room = " with room for an answer" if answer else ""
            raise ContextLengthError(
                f"the prompt has {prompt_tokens} tokens but {self.model.name} with the "
                f"{self.method.name} method serves at most {limit} tokens{room}",
                "shorten the input, or use a block-memory method such as --method infllm")
        return limit

    @torch.inference_mode()
    def _forward(self, ids: list[int], cache: KVCache) -> torch.Tensor:
        decoder = self.model.decoder
        tensor = torch.tensor([ids], dtype=torch.long, device=decoder.device)
        logits = decoder(tensor, cache, Logits.LAST)[0, -1]
        if cache.tiers is not None and cache.tiers.config.ram_budget is not None:
            # A RAM budget is a promise about RSS: give freed activations back after every
            # prefill chunk and decode step (0.1-2 ms; glibc otherwise keeps them once its mmap
            # threshold has risen).
            trim_heap()
        return logits

    def prefill(self, ids: list[int], cache: KVCache, on_prefill: ProgressFn | None = None) -> torch.Tensor:
        """Feed the prompt in chunks; returns the last position's logits [vocab] float32."""
        logits = torch.empty(0)
        for start in range(0, len(ids), self.prefill_chunk):
            logits = self._forward(ids[start:start + self.prefill_chunk], cache)
            if on_prefill is not None:
                on_prefill(min(start + self.prefill_chunk, len(ids)), len(ids))
        return logits

    @torch.inference_mode()
    def token_losses(self, ids: list[int], on_prefill: ProgressFn | None = None) -> torch.Tensor:
        """Negative log-likelihood of each token after the first given all before it, read chunk by
        chunk through the method's memory: [len(ids) - 1] float32 (perplexity by position)."""
        self._check_length(len(ids), answer=False)
        decoder = self.model.decoder
        cache = self.new_cache(self.method.for_context(len(ids)))
        losses = []
        try:
            for start in range(0, len(ids), self.prefill_chunk):
                chunk = ids[start:start + self.prefill_chunk]
                logits = decoder(torch.tensor([chunk], device=decoder.device), cache, Logits.ALL)[0]
                losses.append(next_token_losses(logits, ids, start).cpu())
                if on_prefill is not None:
                    on_prefill(start + len(chunk), len(ids))
        finally:
            cache.close()
        return torch.cat(losses)

    def new_cache(self, method: AttentionMethod | None = None) -> KVCache:
        decoder = self.model.decoder
        return (method or self.method).new_cache(decoder.layer_specs(), decoder.device, decoder.dtype, self.tiers)

    def _run(self, ids: list[int], params: SamplingParams, on_prefill: ProgressFn | None,
             cache: KVCache | None = None) -> Generator[str, None, Completion]:
        """Prefill `ids` into `cache` (a new one by default; a saved memory's when given) and decode."""
        limit = self._check_length((cache.length if cache is not None else 0) + len(ids))
        start_length = cache.length if cache is not None else 0
        budget = params.max_new_tokens if limit is None else min(params.max_new_tokens,
                                                                 limit - start_length - len(ids))
        stats = Stats(prompt_tokens=len(ids), memory_tokens=start_length)
        sampler, detokenizer, stops = Sampler(params), StreamDecoder(self.model.tokenizer), StopMatcher(params.stop)
        eos = frozenset() if params.ignore_eos else self.model.tokenizer.eos_ids
        method = self.method if cache is not None else self.method.for_context(len(ids))
        cache = cache if cache is not None else self.new_cache(method)
        try:
            started = time.perf_counter()
            logits = self.prefill(ids, cache, on_prefill)
            stats.prefill_seconds = time.perf_counter() - started
            moved_at_prefill = cache.tiers.bytes_moved() if cache.tiers is not None else 0
            generated: list[int] = []
            pieces: list[str] = []
            finish = "length"
            token = sampler(logits)
            stats.time_to_first_token = first = time.perf_counter() - started
            while True:
                if token in eos:
                    finish = "stop"
                    break
                generated.append(token)
                piece = stops.feed(detokenizer.push(token))
                if piece:
                    pieces.append(piece)
                    yield piece
                if stops.stopped:
                    finish = "stop"
                    break
                if len(generated) >= budget:
                    break
                token = sampler(self._forward([token], cache))
                stats.decode_steps += 1
            tail = stops.feed(detokenizer.flush()) + stops.flush()
            if tail:
                pieces.append(tail)
                yield tail
            stats.generated_tokens = len(generated)
            stats.decode_seconds = time.perf_counter() - started - first
            stats.peak_rss_bytes = peak_rss_bytes()
            stats.peak_gpu_bytes = peak_gpu_bytes(self.model.decoder.device)
            stats.kv_cache_bytes = cache.nbytes()
            if cache.tiers is not None:
                stats.tiers = cache.tiers.stats()
                stats.resident_kv_bytes = cache.nbytes() - cache.tiers.stored_bytes() + cache.tiers.resident_bytes()
                if stats.decode_steps:
                    moved = cache.tiers.bytes_moved() - moved_at_prefill
                    stats.bytes_moved_per_token = round(moved / stats.decode_steps)
            described = method.describe()
            if cache.telemetry is not None:
                described["telemetry"] = cache.telemetry.summary()
            return Completion("".join(pieces), generated, finish, stats, described)
        finally:
            cache.close()
