"""Saved memories: one `.bmem` file that holds a context memory so it reopens without prefill.

Layout (format version 1; all integers little-endian):

    0    magic b"BMEM", u32 format version, u64 header bytes H, 32-byte sha256 of the header
    48   header: UTF-8 JSON padded with spaces to H bytes
    ...  arrays, each at a 4096-byte aligned offset the header names

The header holds what a reader must check before trusting the arrays: the format version; the
model fingerprint (config + sampled bytes of the weight files) and tokenizer fingerprint; the
compute and storage dtypes; the method and its settings; the prefill chunk; the prompt style;
the documents and the token count; and per layer its integer state (tokens written, tokens
evicted, blocks) and the offset, dtype, shape and crc32 of every array. Arrays: the token ids
(int32; token i sits at position i), per layer the sinks, the window (keys, values, attention
mass), the summaries of every block, the blocks themselves as one array of pages
[blocks, 2, Hkv, block, D] with one crc32 per page, and (sliding-window layers) their keys.

Safety: a writer takes an exclusive lock (NAME.bmem.lock), writes `.NAME.bmem.partial-PID`
beside the target, marks the header complete last, fsyncs and renames it over the target, so a
crash or Ctrl-C leaves the old memory as it was; a partial file never opens as valid. Readers
take no lock: a rename never changes a file a reader has open. Opening checks the magic,
version, header hash, completeness, size and fingerprints; the small arrays are checked when
first read and each block the first time it is read from disk; `verify` checks everything.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import struct
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from blockmem.errors import MemoryFileError
from blockmem.memory.tiers import BaseBlocks, read_at

MAGIC = b"BMEM"
VERSION = 1
PREAMBLE = struct.Struct("<4sIQ32s")
ALIGN = 4096
_REBUILD = "rebuild it with `blockmem memory build`"

DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16", torch.int32: "int32",
               torch.int64: "int64", torch.uint32: "uint32"}
DTYPES = {name: dtype for dtype, name in DTYPE_NAMES.items()}


def _align(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def _raw(tensor: torch.Tensor) -> memoryview:
    """The bytes of a tensor (any dtype) as stored in memory."""
    flat = tensor.detach().contiguous().cpu().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy()).cast("B")


def _sample_file(digest: Any, path: Path, pieces: int = 16, size: int = 1 << 16) -> None:
    """Feed a file's size and evenly spaced byte ranges (cheap for multi-GB weights)."""
    total = path.stat().st_size
    digest.update(f"{path.name}:{total}".encode())
    with path.open("rb") as handle:
        for i in range(pieces):
            handle.seek(max(0, (total - size) * i // max(1, pieces - 1)))
            digest.update(handle.read(size))


def model_fingerprint(config: Any, path: Path) -> str:
    """sha256 of the model config and sampled bytes of its weight files."""
    digest = hashlib.sha256(repr({k: v for k, v in vars(config).items() if k != "name"}).encode())
    files = [path] if path.is_file() else sorted(p for p in path.iterdir() if p.suffix in (".safetensors", ".gguf",
                                                                                              ".bin"))
    for file in files:
        _sample_file(digest, file)
    return digest.hexdigest()[:32]


def tokenizer_fingerprint(tokenizer: Any) -> str:
    digest = hashlib.sha256(tokenizer.backend.to_str().encode())
    digest.update(repr((tokenizer.chat_template, tokenizer.bos_token, tokenizer.eos_token)).encode())
    return digest.hexdigest()[:32]


# ---- writing --------------------------------------------------------------------------------------

@dataclass
class Plan:
    """What a writer will put in the file: small arrays (tensors in hand) and block arrays
    (pages read one at a time from `read_page(layer, index)`)."""

    header: dict[str, Any]
    arrays: dict[str, torch.Tensor] = field(default_factory=dict)
    blocks: dict[int, int] = field(default_factory=dict)  # layer -> block count
    page_shape: tuple[int, ...] = ()
    page_dtype: torch.dtype = torch.float32
    read_page: Callable[[int, int], torch.Tensor] | None = None


class _Sink:
    """The partial file being written (kept small so tests can interrupt a write at any point)."""

    def __init__(self, handle: Any) -> None:
        self.handle = handle

    def write_at(self, offset: int, data: bytes | memoryview) -> None:
        self.handle.seek(offset)
        self.handle.write(data)


@contextlib.contextmanager
def writer_lock(path: Path) -> Iterator[None]:
    """Exclusive lock for writing `path`; refuses at once if another writer holds it."""
    lock = path.with_name(path.name + ".lock")
    handle = open(lock, "a+")
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise MemoryFileError(f"another process is writing {path}", "wait for it to finish") from None
        yield
    finally:
        handle.close()


def write(path: Path, plan: Plan, progress: Callable[[int, int], None] | None = None) -> None:
    """Write `plan` to `path` atomically (call under `writer_lock`)."""
    path = Path(path)
    for stale in path.parent.glob(f".{path.name}.partial-*"):  # left by a writer that was killed
        stale.unlink(missing_ok=True)
    partial = path.with_name(f".{path.name}.partial-{os.getpid()}")
    header = dict(plan.header)
    offsets: dict[str, dict[str, Any]] = {}
    layout: list[tuple[str, int]] = []
    page_bytes = int(np.prod(plan.page_shape)) * torch.empty(0, dtype=plan.page_dtype).element_size() \
        if plan.blocks else 0
    for name, tensor in plan.arrays.items():
        size = tensor.numel() * tensor.element_size()
        offsets[name] = {"dtype": DTYPE_NAMES[tensor.dtype], "shape": list(tensor.shape), "crc32": "0" * 8}
        layout.append((name, size))
    for layer, count in plan.blocks.items():
        name = f"blocks.{layer}"
        offsets[name] = {"dtype": DTYPE_NAMES[plan.page_dtype], "shape": [count, *plan.page_shape]}
        layout.append((name, count * page_bytes))
        offsets[f"blocks.{layer}.crc32"] = {"dtype": "uint32", "shape": [count], "crc32": "0" * 8}
        layout.append((f"blocks.{layer}.crc32", count * 4))
    header["arrays"] = offsets
    header["complete"] = False
    widest = 10 ** 15  # placeholders as wide as any real offset, so the final header is no longer
    header["file_bytes"] = widest
    for entry in offsets.values():
        entry["offset"] = widest
    draft = json.dumps(header).encode()
    reserved = _align(len(draft) + 1024 + PREAMBLE.size) - PREAMBLE.size
    cursor = PREAMBLE.size + reserved
    for name, size in layout:
        offsets[name]["offset"] = cursor
        cursor = _align(cursor + size)
    header["file_bytes"] = cursor

    def put_header(sink: _Sink) -> None:
        text = json.dumps(header).encode()
        if len(text) > reserved:
            raise AssertionError("memory header outgrew its reserved space")
        text = text.ljust(reserved, b" ")
        sink.write_at(0, PREAMBLE.pack(MAGIC, VERSION, reserved, hashlib.sha256(text).digest()))
        sink.write_at(PREAMBLE.size, text)

    total_blocks = sum(plan.blocks.values())
    try:
        with open(partial, "wb") as handle:
            sink = _Sink(handle)
            put_header(sink)  # complete: false until everything else is written
            for name, tensor in plan.arrays.items():
                data = _raw(tensor)
                offsets[name]["crc32"] = f"{zlib.crc32(data):08x}"
                sink.write_at(offsets[name]["offset"], data)
            done = 0
            for layer, count in plan.blocks.items():
                crcs = np.empty(count, dtype=np.uint32)
                base = offsets[f"blocks.{layer}"]["offset"]
                for index in range(count):
                    data = _raw(plan.read_page(layer, index))
                    crcs[index] = zlib.crc32(data)
                    sink.write_at(base + index * page_bytes, data)
                    done += 1
                    if progress is not None and done % 64 == 0:
                        progress(done, total_blocks)
                crc_bytes = memoryview(crcs).cast("B")
                offsets[f"blocks.{layer}.crc32"]["crc32"] = f"{zlib.crc32(crc_bytes):08x}"
                sink.write_at(offsets[f"blocks.{layer}.crc32"]["offset"], crc_bytes)
            handle.truncate(cursor)
            handle.flush()
            os.fsync(handle.fileno())
            header["complete"] = True
            put_header(sink)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(partial, path)
        directory = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise


# ---- reading --------------------------------------------------------------------------------------

class MemoryFile:
    """An opened `.bmem` file: the header checked, arrays and blocks read on demand (positioned
    reads from an open descriptor; nothing is mapped, so nothing read stays resident)."""

    def __init__(self, path: str | Path) -> None:
        self.path = path = Path(path)
        if not path.is_file():
            raise MemoryFileError(f"memory not found: {path}", "build one with `blockmem memory build DOC -o NAME.bmem`")
        size = path.stat().st_size
        with open(path, "rb") as handle:
            preamble = handle.read(PREAMBLE.size)
            if len(preamble) < PREAMBLE.size or preamble[:4] != MAGIC:
                raise MemoryFileError(f"{path} is not a blockmem memory file",
                                      "pass a .bmem file written by `blockmem memory build` (documents go to `run -f` or "
                                      "`memory build/extend`)")
            _, version, length, digest = PREAMBLE.unpack(preamble)
            if version != VERSION:
                raise MemoryFileError(f"{path} uses memory format version {version}; this blockmem reads version "
                                      f"{VERSION}", _REBUILD)
            text = handle.read(length)
        if len(text) < length or hashlib.sha256(text).digest() != digest:
            raise MemoryFileError(f"{path}: the header is truncated or corrupt", _REBUILD)
        self.header: dict[str, Any] = json.loads(text)
        if not self.header.get("complete"):
            raise MemoryFileError(f"{path} is incomplete: a build or extend was interrupted while writing it",
                                  "delete it and build again")
        if size != self.header["file_bytes"]:
            raise MemoryFileError(f"{path} is truncated or padded: {size} bytes, expected "
                                  f"{self.header['file_bytes']}", _REBUILD)
        # Arrays and blocks are read on demand with positioned reads from this descriptor (which
        # keeps the file a reader opened even when a writer replaces it).
        self.fd: int | None = os.open(path, os.O_RDONLY)
        self._checked: set[str] = set()

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()

    def _descriptor(self) -> int:
        if self.fd is None:
            raise MemoryFileError(f"{self.path} is closed", "open it again")
        return self.fd

    def summary(self) -> dict[str, Any]:
        """The header fields a person wants (`blockmem memory info`), plus the block count."""
        header = self.header
        info = {key: header[key] for key in ("format", "version", "blockmem", "created", "model", "tokenizer",
                                             "compute_dtype", "storage_dtype", "method", "prefill_chunk", "documents",
                                             "tokens", "file_bytes")}
        info["blocks"] = sum(layer.get("blocks", 0) for layer in header["layers"])
        info["prompt_style"] = header["prompt"]["style"]
        return info

    def check_match(self, model_print: str, tokenizer_print: str, dtype: torch.dtype, model_name: str) -> None:
        built = self.header["model"]
        if built["fingerprint"] != model_print:
            raise MemoryFileError(f"{self.path} was built with model {built['name']}, which differs from "
                                  f"{model_name} (model fingerprints differ)", f"open it with --model {built['name']}")
        if self.header["tokenizer"] != tokenizer_print:
            raise MemoryFileError(f"{self.path} was built with another tokenizer than {model_name}'s", _REBUILD)
        if self.header["compute_dtype"] != DTYPE_NAMES[dtype]:
            raise MemoryFileError(f"{self.path} was built with {self.header['compute_dtype']} activations, this model "
                                  f"runs in {DTYPE_NAMES[dtype]}", f"use --dtype {self.header['compute_dtype']}")

    def array(self, name: str) -> torch.Tensor:
        """A small array, read from the file and checked against its checksum."""
        entry = self.header["arrays"].get(name)
        if entry is None:
            raise MemoryFileError(f"{self.path} has no array {name!r} (the file is corrupt)", _REBUILD)
        dtype = DTYPES[entry["dtype"]]
        data = bytearray(int(np.prod(entry["shape"])) * torch.empty(0, dtype=dtype).element_size())
        if not read_at(self._descriptor(), entry["offset"], memoryview(data)):
            raise MemoryFileError(f"{self.path}: array {name} lies past the end of the file (it is truncated)",
                                  _REBUILD)
        if name not in self._checked:
            if f"{zlib.crc32(data):08x}" != entry["crc32"]:
                raise MemoryFileError(f"{self.path}: array {name} fails its checksum (the file is corrupt)", _REBUILD)
            self._checked.add(name)
        if not data:
            return torch.empty(entry["shape"], dtype=dtype)
        return torch.frombuffer(data, dtype=dtype).reshape(entry["shape"])

    def base_blocks(self) -> BaseBlocks:
        offsets, counts, crcs = {}, {}, {}
        for layer, state in enumerate(self.header["layers"]):
            if state.get("blocks"):
                offsets[layer] = self.header["arrays"][f"blocks.{layer}"]["offset"]
                counts[layer] = state["blocks"]
                crcs[layer] = self.array(f"blocks.{layer}.crc32").tolist()
        return BaseBlocks(os.dup(self._descriptor()), self.path, offsets, counts, crcs)

    def verify(self, progress: Callable[[int, int], None] | None = None) -> int:
        """Check every checksum; returns the bytes checked."""
        names = [n for n in self.header["arrays"] if not (n.startswith("blocks.") and not n.endswith(".crc32"))]
        checked = 0
        for name in names:
            checked += self.array(name).numel()
        base = self.base_blocks()
        total = sum(base.counts.values())
        done = 0
        buffer = memoryview(bytearray(self.header["page_bytes"]))
        for layer, count in base.counts.items():
            for index in range(count):
                base.read(layer, index, buffer)
                done += 1
                if progress is not None and done % 64 == 0:
                    progress(done, total)
        if progress is not None:
            progress(total, total)
        return self.header["file_bytes"]
