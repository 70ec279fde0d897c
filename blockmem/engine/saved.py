"""Read documents once, ask many questions: a context memory saved to a `.bmem` file.

    memory = SavedMemory.build(model, [("book.txt", text)], "book.bmem", method="infllm")
    memory = SavedMemory.open("book.bmem", model)           # milliseconds: nothing is prefilled
    print(memory.ask("Who wrote the letter?").text)
    memory.extend([("sequel.txt", more)])                   # rewrites book.bmem atomically

Prompt layout. For a chat model the memory holds the chat template's opening, then the documents
(separated by a blank line); a question adds "\n\n" + question + the template's closing. For a
plain model (no template, or `raw=True`) the memory holds BOS and the documents, and a question
adds "\n\nQuestion: ...\nAnswer:". Each document is prefilled on its own chunk grid and the
cache's read caches are settled after it, so building [A, B] and building [A] then extending by
[B] write identical memories.
"""

from __future__ import annotations

import time
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

import blockmem
from blockmem.attention import (METHODS, AttentionMethod, KVCache, create_method, method_options, option_flag,
                                restore_method)
from blockmem.engine.generate import Completion, Engine, ProgressFn, Stream
from blockmem.engine.sampler import SamplingParams
from blockmem.errors import ConfigError, MemoryFileError
from blockmem.memory import persist
from blockmem.memory.tiers import TierConfig
from blockmem.model.loader import Model

Document = tuple[str, str]  # (name, text)
_SPLIT = "\x00blockmem-question\x00"


def _method_record(method: AttentionMethod) -> dict[str, Any]:
    options = {}
    for name in method_options(method.name):
        value = getattr(method, name)
        options[name] = value.value if hasattr(value, "value") else value
    return {"name": method.name, "options": options}


def stored_options(stored: dict[str, Any]) -> dict[str, Any]:
    """A header's method options, with those it predates at the values it was built with."""
    kind = METHODS.get(stored["name"])
    return {**(kind.saved_before if kind is not None else {}), **stored["options"]}


def check_method(stored: dict[str, Any], method: str | None, options: dict[str, Any]) -> None:
    """Refuse a method or option that differs from the one a memory was built with."""
    if method is not None and method != stored["name"]:
        raise MemoryFileError(f"the memory was built with --method {stored['name']}, not {method}",
                              f"leave --method out, or build a new memory with --method {method}")
    built = stored_options(stored)
    for key, value in options.items():
        if value is None:
            continue
        held = built.get(key)
        if held != value:
            flag = option_flag(key)
            raise MemoryFileError(f"the memory was built with {flag} {held}, not {value}",
                                  f"leave {flag} out (a memory's settings are fixed when it is built)")


class SavedMemory:
    def __init__(self, model: Model, file: persist.MemoryFile, tiers: TierConfig | None = None) -> None:
        self.model, self.file, self.path = model, file, file.path
        header = file.header
        self.header = header
        stored = header["method"]
        # a header from before a setting existed gets what it was built with: the method's
        # `saved_before` values, and for_context(None) for infllm's switch length
        self.method = restore_method(stored["name"], stored_options(stored)).for_context(None)
        storage = persist.DTYPES[header["storage_dtype"]]
        self.tiers = replace(tiers or TierConfig(), storage_dtype=storage)
        self.engine = Engine(model, self.method, prefill_chunk=header["prefill_chunk"], tiers=self.tiers)

    # -- opening ---------------------------------------------------------------------------------
    @classmethod
    def open(cls, path: str | Path, model: Model, tiers: TierConfig | None = None) -> SavedMemory:
        """Open a saved memory for `model`: checks the file and that it was built for this model,
        tokenizer and dtype; reads no blocks."""
        file = persist.MemoryFile(path)
        try:
            file.check_match(persist.model_fingerprint(model.config, model.path),
                             persist.tokenizer_fingerprint(model.tokenizer), model.decoder.dtype, model.name)
        except BaseException:
            file.close()
            raise
        return cls(model, file, tiers)

    @property
    def tokens(self) -> int:
        return self.header["tokens"]

    def restore(self) -> KVCache:
        """A live cache holding this memory, blocks left on disk until read."""
        decoder = self.model.decoder
        cache = self.method.new_cache(decoder.layer_specs(), decoder.device, decoder.dtype, self.tiers,
                                      base=self.file.base_blocks())
        for index, (layer, state) in enumerate(zip(cache.layers, self.header["layers"])):
            prefix = f"layer.{index}."
            arrays = {name[len(prefix):]: self.file.array(name) for name in self.header["arrays"]
                      if name.startswith(prefix)}
            layer.import_state({k: v for k, v in state.items() if k != "kind"}, arrays)
        cache.length = self.tokens
        return cache

    # -- asking ----------------------------------------------------------------------------------
    def question_ids(self, question: str, raw: bool = False) -> list[int]:
        tokenizer = self.model.tokenizer
        if raw:
            return tokenizer.encode(question, special=False)
        prompt = self.header["prompt"]
        if prompt["style"] == "chat":
            return tokenizer.encode(f"\n\n{question}{prompt['tail']}", special=False)
        return tokenizer.encode(f"\n\nQuestion: {question}\nAnswer:", special=False)

    def stream(self, question: str, *, raw: bool = False, preload: bool = False,
               params: SamplingParams | None = None, **sampling: Any) -> Stream:
        """Answer `question`, yielding text. `preload` reads every block into RAM first (when RAM
        holds them all, later steps never wait for the disk)."""
        params = replace(params or SamplingParams(), **sampling)
        ids = self.question_ids(question, raw)
        if not ids:
            raise ConfigError("the question is empty")
        cache = self.restore()
        if preload and cache.tiers is not None:
            cache.tiers.preload()
        return Stream(self.engine._run(ids, params, None, cache=cache))

    def ask(self, question: str, **kwargs: Any) -> Completion:
        stream = self.stream(question, **kwargs)
        for _ in stream:
            pass
        assert stream.completion is not None
        return stream.completion

    # -- building --------------------------------------------------------------------------------
    @classmethod
    def build(cls, model: Model, documents: list[Document], path: str | Path, method: AttentionMethod | str = "infllm",
              *, prefill_chunk: int | None = None, tiers: TierConfig | None = None, raw: bool = False,
              system: str | None = None, on_progress: ProgressFn | None = None) -> SavedMemory:
        """Prefill `documents` into a new memory and save it to `path` (replacing any file there
        only once the new one is complete)."""
        if not documents:
            raise ConfigError("no documents to build a memory from")
        method = (create_method(method) if isinstance(method, str) else method).for_context(None)
        engine = Engine(model, method, prefill_chunk=prefill_chunk, tiers=tiers)
        prefill_chunk = engine.prefill_chunk
        tokenizer = model.tokenizer
        chat = model.has_chat_template and not raw
        tail = ""
        if chat:
            messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": _SPLIT}]
            head, tail = tokenizer.render_chat(messages).split(_SPLIT)
        elif system:
            raise ConfigError("--system needs a chat model", "leave it out for plain (base) models")
        pieces = []
        for i, (name, text) in enumerate(documents):
            if i == 0:
                ids = tokenizer.encode(head + text, special=False) if chat else tokenizer.encode(text)
            else:
                ids = tokenizer.encode("\n\n" + text, special=False)
            pieces.append((name, ids))
        header = {
            "format": "blockmem-memory", "version": persist.VERSION, "blockmem": blockmem.__version__,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "model": {"name": model.name, "fingerprint": persist.model_fingerprint(model.config, model.path),
                      "family": model.config.family.value, "layers": model.config.num_layers},
            "tokenizer": persist.tokenizer_fingerprint(tokenizer),
            "compute_dtype": persist.DTYPE_NAMES[model.decoder.dtype],
            "storage_dtype": persist.DTYPE_NAMES[(tiers.storage_dtype if tiers else None) or model.decoder.dtype],
            "method": _method_record(method), "prefill_chunk": prefill_chunk,
            "prompt": {"style": "chat" if chat else "plain", "tail": tail},
            "documents": [], "tokens": 0,
        }
        path = Path(path)
        with persist.writer_lock(path):
            cache = engine.new_cache()
            try:
                tokens: list[int] = []
                _prefill_documents(engine, cache, pieces, header, tokens, on_progress)
                persist.write(path, _plan(cache, header, tokens))
            finally:
                cache.close()
        return cls.open(path, model, tiers)

    def extend(self, documents: list[Document], on_progress: ProgressFn | None = None) -> SavedMemory:
        """Append `documents` and rewrite the file atomically; returns the extended memory
        (this object then refers to it too)."""
        if not documents:
            raise ConfigError("no documents to extend the memory with")
        tokenizer = self.model.tokenizer
        pieces = [(name, tokenizer.encode("\n\n" + text, special=False)) for name, text in documents]
        header = {k: v for k, v in self.header.items() if k not in ("arrays", "layers", "complete", "file_bytes")}
        header["documents"] = list(header["documents"])
        with persist.writer_lock(self.path):
            cache = self.restore()
            try:
                tokens = self.file.array("tokens").tolist()
                _prefill_documents(self.engine, cache, pieces, header, tokens, on_progress)
                persist.write(self.path, _plan(cache, header, tokens))
            finally:
                cache.close()
        self.file.close()
        reopened = SavedMemory.open(self.path, self.model, self.tiers)
        self.__dict__.update(reopened.__dict__)
        return self

    def info(self) -> dict[str, Any]:
        return self.file.summary()

    def close(self) -> None:
        self.file.close()


def _prefill_documents(engine: Engine, cache: KVCache, pieces: list[tuple[str, list[int]]], header: dict[str, Any],
                       tokens: list[int], on_progress: ProgressFn | None) -> None:
    """Each document on its own chunk grid, then settle the read caches (see module doc)."""
    total, done = sum(len(ids) for _, ids in pieces), 0
    limit = engine.context_limit()
    if limit is not None and len(tokens) + total >= limit:
        raise ConfigError(f"the documents need {len(tokens) + total} tokens but {engine.model.name} with the "
                          f"{engine.method.name} method serves at most {limit} tokens with room for a question",
                          "use a block-memory method such as --method infllm")
    for name, ids in pieces:
        started = time.perf_counter()

        def progress(n: int, _: int, base: int = done) -> None:
            if on_progress is not None:
                on_progress(base + n, total)

        engine.prefill(ids, cache, progress)
        cache.settle()
        done += len(ids)
        tokens.extend(ids)
        header["documents"].append({"name": name, "tokens": len(ids),
                                    "prefill_seconds": round(time.perf_counter() - started, 2)})
    header["tokens"] = len(tokens)


def _plan(cache: KVCache, header: dict[str, Any], tokens: list[int]) -> persist.Plan:
    cache.settle()
    plan = persist.Plan(header=dict(header))
    plan.arrays["tokens"] = torch.tensor(tokens, dtype=torch.int32)
    layers = []
    for index, layer in enumerate(cache.layers):
        ints, arrays = layer.export_state()
        layers.append({"kind": type(layer).__name__, **ints})
        for name, tensor in arrays.items():
            plan.arrays[f"layer.{index}.{name}"] = tensor.detach().cpu()
        if ints.get("blocks"):
            plan.blocks[index] = ints["blocks"]
    plan.header["layers"] = layers
    tiers = cache.tiers
    if tiers is not None:
        plan.page_shape, plan.page_dtype, plan.read_page = tiers.page_shape, tiers.storage_dtype, tiers.read_authoritative
        plan.header["page_shape"], plan.header["page_bytes"] = list(tiers.page_shape), tiers.page_bytes
    else:
        plan.header["page_shape"], plan.header["page_bytes"] = [], 0
    return plan


def documents_from_files(files: list[Path]) -> list[Document]:
    """(name, text) for UTF-8 text files, with clear errors."""
    out = []
    for path in files:
        if not path.is_file():
            raise ConfigError(f"document not found: {path}", "check the path; documents are read as UTF-8 text")
        try:
            out.append((path.name, path.read_text(encoding="utf-8")))
        except UnicodeDecodeError:
            raise ConfigError(f"{path} is not UTF-8 text", "convert it to UTF-8 plain text first") from None
    return out


__all__ = ["SavedMemory", "check_method", "documents_from_files"]
