"""Rebuild a GGUF file's vocabulary as a `tokenizers` pipeline.

Two kinds cover the supported families:
- `gpt2`: byte-level BPE with the file's merges; the pre-tokenizer split follows the file's
  `tokenizer.ggml.pre` name as llama.cpp does (SmolLM2's `smollm` isolates every digit).
- `llama`: SentencePiece-style BPE with byte fallback. The file has no merges, so they are
  derived from the vocabulary: every split of a token into two tokens, ranked by the merged
  token's priority (its score; for Gemma, its position in the file, since Gemma's scores do not
  follow its merge order). Deriving 262K Gemma merges takes seconds, so the result is cached
  under ~/.cache/blockmem/tokenizers, keyed by a hash of the vocabulary.
"""

from __future__ import annotations

import hashlib
import os
from typing import Any

from tokenizers import AddedToken, Regex, decoders, normalizers, pre_tokenizers, processors
from tokenizers import Tokenizer as Backend
from tokenizers.models import BPE

from blockmem.cache import cache_dir
from blockmem.errors import ModelError

CONTROL, USER_DEFINED = 3, 4
_LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
           r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
          r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_SPLITS = {"llama-bpe": _LLAMA3, "llama3": _LLAMA3, "llama-v3": _LLAMA3, "smaug-bpe": _LLAMA3, "dbrx": _LLAMA3,
           "qwen2": _QWEN2, "deepseek-r1-qwen": _QWEN2}


def _byte_level_pre(pre: str) -> Any:
    if pre in _SPLITS:
        return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(_SPLITS[pre]), behavior="isolated"),
                                        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)  # GPT-2 split
    if pre == "smollm":
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    return byte_level


def _byte_level_bpe(meta: dict[str, Any]) -> Backend:
    tokens = meta["tokenizer.ggml.tokens"]
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges", [])]
    backend = Backend(BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, fuse_unk=False))
    backend.pre_tokenizer = _byte_level_pre(str(meta.get("tokenizer.ggml.pre", "default")))
    backend.decoder = decoders.ByteLevel()
    return backend


def _spm_tokens(meta: dict[str, Any]) -> list[str]:
    # Gemma stores whitespace-run tokens with real spaces; the pipeline spells spaces "▁".
    return ["\u2581" * len(t) if t and not t.strip(" ") else t for t in meta["tokenizer.ggml.tokens"]]


def derive_merges(tokens: list[str], priority: list[float]) -> list[tuple[str, str]]:
    """Every (left, right) pair of tokens that concatenates to a token, best merged token first."""
    vocab = {t: i for i, t in enumerate(tokens)}
    found = []
    for token, score in zip(tokens, priority):
        pairs = [(token[:k], token[k:]) for k in range(1, len(token)) if token[:k] in vocab and token[k:] in vocab]
        pairs.sort(key=lambda p: (vocab[p[0]], vocab[p[1]]))
        found.extend((left, right, score) for left, right in pairs)
    found.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(left, right) for left, right, _ in found]


def _spm_bpe(meta: dict[str, Any], gemma: bool) -> Backend:
    tokens = _spm_tokens(meta)
    if gemma:
        priority = [-float(i) for i in range(len(tokens))]
    else:
        priority = [float(s) for s in meta.get("tokenizer.ggml.scores", [0.0] * len(tokens))]
    unk = meta.get("tokenizer.ggml.unknown_token_id")
    model = BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=derive_merges(tokens, priority),
                unk_token=tokens[unk] if unk is not None else None, fuse_unk=True, byte_fallback=True)
    backend = Backend(model)
    replace = normalizers.Replace(" ", "\u2581")
    steps = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    if meta.get("tokenizer.ggml.add_space_prefix", not gemma):
        backend.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), replace])
        steps.append(decoders.Strip(" ", 1, 0))
    else:
        backend.normalizer = replace
    backend.decoder = decoders.Sequence(steps)
    return backend


def _cached_spm(meta: dict[str, Any], gemma: bool) -> Backend:
    digest = hashlib.sha256()
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.scores", "tokenizer.ggml.unknown_token_id",
                "tokenizer.ggml.add_space_prefix"):
        digest.update(repr(meta.get(key)).encode())
    digest.update(b"gemma" if gemma else b"spm")
    path = cache_dir("tokenizers") / f"spm-{digest.hexdigest()[:24]}.json"
    if path.is_file():
        try:
            return Backend.from_file(str(path))
        except Exception:  # a damaged cache entry is rebuilt, never trusted
            path.unlink(missing_ok=True)
    backend = _spm_bpe(meta, gemma)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        backend.save(str(tmp))
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only cache only costs the rebuild next time
    return backend


def _add_special_tokens(backend: Backend, meta: dict[str, Any]) -> None:
    tokens, types = meta["tokenizer.ggml.tokens"], meta.get("tokenizer.ggml.token_type") or []
    control = [AddedToken(t, special=True, normalized=False) for t, k in zip(tokens, types) if k == CONTROL]
    user = [AddedToken(t, special=False, normalized=False) for t, k in zip(tokens, types)
            if k == USER_DEFINED and t.strip(" ")]
    backend.add_special_tokens(control)
    backend.add_tokens(user)


def backend_from_gguf(meta: dict[str, Any], source: str) -> Backend:
    kind = meta.get("tokenizer.ggml.model")
    if "tokenizer.ggml.tokens" not in meta:
        raise ModelError(f"{source} has no tokenizer vocabulary", "use a GGUF converted with its tokenizer")
    if kind == "gpt2":
        backend = _byte_level_bpe(meta)
    elif kind == "llama":
        backend = _cached_spm(meta, gemma=str(meta.get("general.architecture", "")).startswith("gemma"))
    else:
        raise ModelError(f"{source}: tokenizer type {kind!r} is not supported", "supported: gpt2 (BPE), llama (SPM)")
    _add_special_tokens(backend, meta)
    add_bos = meta.get("tokenizer.ggml.add_bos_token", kind == "llama")
    bos = meta.get("tokenizer.ggml.bos_token_id")
    if add_bos and bos is not None:
        bos_text = meta["tokenizer.ggml.tokens"][bos]
        backend.post_processor = processors.TemplateProcessing(single=f"{bos_text} $A", pair=f"{bos_text} $A $B",
                                                               special_tokens=[(bos_text, bos)])
    return backend
