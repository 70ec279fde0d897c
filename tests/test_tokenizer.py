"""Tokenizers: GGUF vocabularies rebuilt as pipelines, chat templates, streaming detokenization."""

from __future__ import annotations

import pytest

import blockmem
from blockmem.cache import cache_dir
from blockmem.model.gguf_vocab import _cached_spm, derive_merges
from blockmem.model.tokenizer import StreamDecoder

TEXTS = ["Hello world! The capital of France is Paris.", "  leading spaces\tand tabs\n\nnew lines  ",
         "passkey 90210 and 3.14159", "café naïve 日本語 😀🚀 Ελληνικά", "code:\n    return x**2  # c\n"]


def test_derive_merges_ranks_by_merged_token() -> None:
    tokens = ["a", "b", "c", "bc", "ab", "abc"]
    priority = [0.0, 0.0, 0.0, -1.0, -2.0, -3.0]  # "bc" merges before "ab"
    # Both splits of "abc" rank with it; the longer left piece goes first, as in transformers.
    assert derive_merges(tokens, priority) == [("b", "c"), ("a", "b"), ("ab", "c"), ("a", "bc")]


def test_spm_cache_round_trip(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("BLOCKMEM_CACHE", str(tmp_path))
    meta = {"tokenizer.ggml.tokens": ["<unk>", "\u2581", "a", "b", "\u2581a", "ab", "<0x41>"],
            "tokenizer.ggml.scores": [0.0, -1.0, -2.0, -3.0, -4.0, -5.0, 0.0], "tokenizer.ggml.unknown_token_id": 0,
            "tokenizer.ggml.add_space_prefix": True}
    fresh = _cached_spm(meta, gemma=False)
    files = list(cache_dir("tokenizers").glob("spm-*.json"))
    assert len(files) == 1
    cached = _cached_spm(meta, gemma=False)
    for text in ("ab a", "a b", "A"):
        assert cached.encode(text).ids == fresh.encode(text).ids
    assert fresh.encode("ab").tokens == ["\u2581a", "b"]  # "\u2581a" outranks "ab"
    files[0].write_text("{ damaged")
    assert _cached_spm(meta, gemma=False).encode("ab a").ids == fresh.encode("ab a").ids  # rebuilt


def _stream(tokenizer, ids: list[int]) -> list[str]:
    decoder = StreamDecoder(tokenizer)
    pieces = [decoder.push(i) for i in ids]
    return pieces + [decoder.flush()]


def test_stream_decoder_pieces_join_to_full_text(tiny_llama) -> None:
    tok = tiny_llama.tokenizer
    for text in TEXTS:
        ids = tok.encode(text)
        pieces = _stream(tok, ids)
        assert "".join(pieces) == tok.decode(ids) == text
        assert all("\ufffd" not in p for p in pieces)  # never half a character


def test_chat_template_renders(tiny_llama) -> None:
    tok = tiny_llama.tokenizer
    text = tok.render_chat([{"role": "user", "content": "hi"}])
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    ids = tok.encode_chat([{"role": "user", "content": "hi"}])
    assert ids[0] == tok.backend.token_to_id("<|im_start|>")  # special tokens stay whole
    assert tok.backend.token_to_id("<|im_end|>") in tok.eos_ids


def test_template_helpers_and_errors(tiny_llama) -> None:
    from dataclasses import replace

    from blockmem.errors import ConfigError

    tok = replace(tiny_llama.tokenizer, chat_template="{{ messages | tojson }}{% if messages|length > 1 %}"
                  "{{ raise_exception('one message only') }}{% endif %}", _template=None)
    assert tok.render_chat([{"role": "user", "content": "é"}]) == '[{"role": "user", "content": "é"}]'
    with pytest.raises(ConfigError, match="one message only"):
        tok.render_chat([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])
    with pytest.raises(ConfigError, match="no chat template"):
        replace(tok, chat_template=None).render_chat([{"role": "user", "content": "a"}])


@pytest.mark.slow
@pytest.mark.parametrize("name", ["smollm2-135m", "gemma3-270m"])
def test_real_gguf_tokenizers_match_transformers(name: str) -> None:
    from transformers import AutoTokenizer

    from blockmem.model.catalog import CATALOG
    from blockmem.model.loader import load_tokenizer

    path = CATALOG[name].locate()
    ours = load_tokenizer(path)
    ref = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    special = ["<|im_start|>user\nhi<|im_end|>\n", "<start_of_turn>user\nhi<end_of_turn>\n", "</iframe> a  b   c"]
    for text in TEXTS + special:
        ids = ours.encode(text)
        assert ids == ref(text)["input_ids"], text
        assert ours.decode(ids) == ref.decode(ids, skip_special_tokens=True)
        assert "".join(_stream(ours, ids)) == ours.decode(ids)


def test_load_tokenizer_matches_the_loaded_models(tiny) -> None:
    from blockmem.model.loader import load_tokenizer

    for source in (tiny.get("llama")[0], None):  # an HF directory; the default GGUF
        expected = blockmem.load(source, device="cpu").tokenizer
        alone = load_tokenizer(source)
        assert alone.encode("Hello world, 12345!") == expected.encode("Hello world, 12345!")
        assert alone.chat_template == expected.chat_template
