"""The generate loop: limits, stops, streaming, chunking, context length."""

from __future__ import annotations

from dataclasses import replace

import pytest

import blockmem
from blockmem.engine import Engine, SamplingParams
from blockmem.errors import ConfigError, ContextLengthError

PROMPT = "The quick brown fox"


def greedy(model, **kwargs) -> blockmem.Completion:
    return Engine(model).generate(PROMPT, raw=True, ignore_eos=True, **kwargs)


def test_max_new_tokens_and_finish_reason(tiny_llama) -> None:
    out = greedy(tiny_llama, max_new_tokens=9)
    assert len(out.token_ids) == 9 and out.finish_reason == "length"
    assert out.stats.generated_tokens == 9 and out.stats.decode_steps == 8
    assert out.stats.prompt_tokens == len(tiny_llama.tokenizer.encode(PROMPT))
    assert out.stats.peak_rss_bytes > 0 and out.stats.kv_cache_bytes > 0


def test_stream_and_callback_match_text(tiny_llama) -> None:
    engine = Engine(tiny_llama)
    stream = engine.stream(PROMPT, raw=True, max_new_tokens=20, ignore_eos=True)
    pieces = list(stream)
    seen: list[str] = []
    out = engine.generate(PROMPT, raw=True, max_new_tokens=20, ignore_eos=True, on_text=seen.append)
    assert "".join(pieces) == stream.completion.text == out.text == "".join(seen)
    assert out.text == tiny_llama.tokenizer.decode(out.token_ids)


def test_stop_string_ends_generation(tiny_llama) -> None:
    full = greedy(tiny_llama, max_new_tokens=30).text
    stop = full[len(full) // 2: len(full) // 2 + 3]
    assert stop.strip()
    out = greedy(tiny_llama, max_new_tokens=30, stop=(stop,))
    assert out.finish_reason == "stop"
    assert out.text == full[: full.index(stop)]


def test_eos_ends_generation(tiny_llama) -> None:
    first = greedy(tiny_llama, max_new_tokens=1).token_ids[0]
    model = replace(tiny_llama, tokenizer=replace(tiny_llama.tokenizer, eos_ids=frozenset({first})))
    out = Engine(model).generate(PROMPT, raw=True, max_new_tokens=5)
    assert out.token_ids == [] and out.finish_reason == "stop" and out.text == ""


def test_prefill_chunk_size_does_not_change_output(tiny_llama) -> None:
    prompt = " ".join(["lazy dog"] * 30)
    outs = {chunk: Engine(tiny_llama, prefill_chunk=chunk).generate(prompt, raw=True, max_new_tokens=12,
                                                                      ignore_eos=True).token_ids
            for chunk in (1, 7, 512)}
    assert outs[1] == outs[7] == outs[512]


def test_prefill_chunk_defaults_to_512_under_a_ram_budget(tiny_llama, tmp_path) -> None:
    """A RAM budget promises a bounded RSS: the default chunk halves the prefill's activations."""
    from blockmem.engine.saved import SavedMemory
    from blockmem.memory.persist import MemoryFile
    from blockmem.memory.tiers import TierConfig

    bounded = TierConfig(ram_budget=1 << 24, spill_dir=str(tmp_path))
    assert Engine(tiny_llama).prefill_chunk == 1024
    assert Engine(tiny_llama, "infllm", tiers=TierConfig(storage_dtype=None)).prefill_chunk == 1024
    assert Engine(tiny_llama, "infllm", tiers=bounded).prefill_chunk == 512
    assert Engine(tiny_llama, "infllm", prefill_chunk=64, tiers=bounded).prefill_chunk == 64
    SavedMemory.build(tiny_llama, [("a.txt", "fox " * 40)], tmp_path / "m.bmem", "infllm", tiers=bounded)
    assert MemoryFile(tmp_path / "m.bmem").header["prefill_chunk"] == 512  # extend reuses it


def test_progress_callback_reports_chunks(tiny_llama) -> None:
    seen: list[tuple[int, int]] = []
    ids = tiny_llama.tokenizer.encode(" ".join(["fox"] * 50))
    Engine(tiny_llama, prefill_chunk=16).generate(prompt_ids=ids, max_new_tokens=1, on_prefill=lambda d, t: seen.append((d, t)))
    assert seen[-1] == (len(ids), len(ids)) and [d for d, _ in seen] == sorted(d for d, _ in seen)
    assert len(seen) == -(-len(ids) // 16)


def test_context_limit(tiny_llama) -> None:
    limit = tiny_llama.config.max_context
    with pytest.raises(ContextLengthError, match=f"serves at most {limit}"):
        Engine(tiny_llama).generate(prompt_ids=[5] * limit, max_new_tokens=4)
    out = Engine(tiny_llama).generate(prompt_ids=[5] * (limit - 3), max_new_tokens=50, ignore_eos=True)
    assert len(out.token_ids) == 3 and out.finish_reason == "length"
    # scoring a text needs no answer token: the whole window can be scored, one token more cannot
    assert Engine(tiny_llama).token_losses([5] * limit).shape == (limit - 1,)
    with pytest.raises(ContextLengthError, match=f"the prompt has {limit + 1} tokens"):
        Engine(tiny_llama).token_losses([5] * (limit + 1))


def test_chat_and_raw_prompts_differ(tiny_llama) -> None:
    engine = Engine(tiny_llama)
    assert engine.encode(PROMPT, raw=True) == tiny_llama.tokenizer.encode(PROMPT)
    assert engine.encode(PROMPT) == tiny_llama.tokenizer.encode_chat([{"role": "user", "content": PROMPT}])


def test_bad_requests(tiny_llama) -> None:
    with pytest.raises(ConfigError, match="unknown attention method"):
        Engine(tiny_llama, method="nope")
    with pytest.raises(ConfigError, match="prefill chunk"):
        Engine(tiny_llama, prefill_chunk=0)
    with pytest.raises(ConfigError, match="empty"):
        Engine(tiny_llama).generate(prompt_ids=[])
    with pytest.raises(ConfigError):
        Engine(tiny_llama).generate(PROMPT, params=SamplingParams(), top_p=2.0)
