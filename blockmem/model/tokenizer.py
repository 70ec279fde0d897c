"""Tokenizers from HF directories (tokenizer.json) and GGUF metadata, chat templates, streaming.

GGUF files carry a vocabulary, not a tokenizer; `model/gguf_vocab.py` rebuilds it as a
`tokenizers` pipeline. Chat templates are Jinja, rendered in a sandbox with the helpers
Hugging Face templates expect (`raise_exception`, `tojson`, `strftime_now`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as Backend

from blockmem.errors import ConfigError, ModelError
from blockmem.model.hf import read_json

# Tokens that end an assistant turn in common chat formats; when a vocabulary has them as
# special tokens they stop generation like EOS does.
END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<end_of_turn>", "<|end|>", "<|endoftext|>")


@dataclass
class Tokenizer:
    backend: Backend
    eos_ids: frozenset[int]
    bos_token: str | None = None
    eos_token: str | None = None
    chat_template: str | None = None
    _template: jinja2.Template | None = field(default=None, repr=False)

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, special: bool = True) -> list[int]:
        """Token ids; `special` adds what the tokenizer adds to a bare text (e.g. BOS)."""
        return self.backend.encode(text, add_special_tokens=special).ids

    def decode(self, ids: list[int], skip_special: bool = True) -> str:
        return self.backend.decode(ids, skip_special_tokens=skip_special)

    def render_chat(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        if not self.chat_template:
            raise ConfigError("this model has no chat template (it is a base model)",
                              "pass the prompt as plain text (`--raw` on the command line)")
        if self._template is None:
            self._template = _environment().from_string(self.chat_template)
        try:
            return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                         bos_token=self.bos_token or "", eos_token=self.eos_token or "")
        except jinja2.TemplateError as exc:
            raise ConfigError(f"the model's chat template rejected the conversation: {exc}") from None

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        # The template writes BOS itself where the model wants it.
        return self.encode(self.render_chat(messages), special=False)

    def end_of_turn_ids(self) -> frozenset[int]:
        ids = {self.backend.token_to_id(t) for t in END_OF_TURN}
        return frozenset(i for i in ids if i is not None)


def _environment() -> jinja2.Environment:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])

    def raise_exception(message: str) -> None:
        raise jinja2.TemplateError(message)

    def tojson(value: Any, indent: int | None = None, ensure_ascii: bool = False) -> str:
        return json.dumps(value, indent=indent, ensure_ascii=ensure_ascii)

    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


def _token_text(value: Any) -> str | None:
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _hf_chat_template(directory: Path, config: dict[str, Any]) -> str | None:
    jinja_file = directory / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8")
    if (directory / "chat_template.json").is_file():
        return read_json(directory / "chat_template.json").get("chat_template")
    template = config.get("chat_template")
    if isinstance(template, list):  # named templates: use the default one
        named = {t.get("name"): t.get("template") for t in template}
        template = named.get("default") or next(iter(named.values()), None)
    return template


def tokenizer_from_hf(directory: Path) -> Tokenizer:
    path = directory / "tokenizer.json"
    if not path.is_file():
        raise ModelError(f"{directory} has no tokenizer.json",
                         "blockmem reads fast tokenizers; save one with transformers: "
                         "AutoTokenizer.from_pretrained(dir).save_pretrained(dir)")
    try:
        backend = Backend.from_file(str(path))
    except Exception as exc:  # the Rust tokenizer raises plain Exception on a malformed file
        raise ModelError(f"{path} could not be read ({exc})", "download it again") from None
    config = read_json(directory / "tokenizer_config.json") if (directory / "tokenizer_config.json").is_file() else {}
    eos_token = _token_text(config.get("eos_token"))
    eos_ids: set[int] = set()
    for source in ("generation_config.json", "config.json"):
        if (directory / source).is_file():
            value = read_json(directory / source).get("eos_token_id")
            eos_ids.update(value if isinstance(value, list) else [value] if value is not None else [])
    if eos_token and backend.token_to_id(eos_token) is not None:
        eos_ids.add(backend.token_to_id(eos_token))
    tokenizer = Tokenizer(backend, frozenset(eos_ids), _token_text(config.get("bos_token")), eos_token,
                          _hf_chat_template(directory, config))
    tokenizer.eos_ids = tokenizer.eos_ids | tokenizer.end_of_turn_ids()
    return tokenizer


class StreamDecoder:
    """Turns token ids into text pieces as they arrive, never splitting a UTF-8 character.

    Decodes a short window of recent ids twice (with and without the newest) and emits the
    difference; decoding the window rather than one id keeps tokenizers that strip or merge
    spaces at a token boundary correct.
    """

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix = self.read = 0

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        before = self.tokenizer.decode(self.ids[self.prefix:self.read])
        after = self.tokenizer.decode(self.ids[self.prefix:])
        if len(after) <= len(before) or after.endswith("\ufffd"):
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        return after[len(before):]

    def flush(self) -> str:
        """Whatever is still held back (e.g. an incomplete character at the very end)."""
        before = self.tokenizer.decode(self.ids[self.prefix:self.read])
        after = self.tokenizer.decode(self.ids[self.prefix:])
        self.prefix = self.read = len(self.ids)
        return after[len(before):]


def tokenizer_from_gguf(meta: dict[str, Any], source: str) -> Tokenizer:
    from blockmem.model.gguf_vocab import backend_from_gguf

    backend = backend_from_gguf(meta, source)
    tokens = meta["tokenizer.ggml.tokens"]

    def token(key: str) -> str | None:
        index = meta.get(f"tokenizer.ggml.{key}")
        return tokens[index] if index is not None and 0 <= index < len(tokens) else None

    eos_ids = {meta.get(f"tokenizer.ggml.{k}") for k in ("eos_token_id", "eot_token_id", "eom_token_id")}
    tokenizer = Tokenizer(backend, frozenset(i for i in eos_ids if i is not None), token("bos_token_id"),
                          token("eos_token_id"), meta.get("tokenizer.chat_template"))
    tokenizer.eos_ids = tokenizer.eos_ids | tokenizer.end_of_turn_ids()
    return tokenizer
