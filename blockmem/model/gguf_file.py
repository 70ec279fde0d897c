"""A small reader for GGUF files: metadata, tensor table, and memory-mapped tensor bytes.

`gguf.GGUFReader` builds a numpy view for every metadata element, which takes seconds on a
262K-token vocabulary; this reader parses the header once into Python values and leaves the
tensor data memory-mapped, so opening a file costs milliseconds and no RAM.
Layout (GGUF v2/v3): magic, version, tensor count, kv count, key/values, tensor infos, padding,
data. Every size is checked against the file, so a truncated file fails here with its name.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from blockmem.errors import ModelError

_SCALARS = {  # GGUF value type -> struct format
    0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d",
}
_NUMPY = {0: np.uint8, 1: np.int8, 2: np.uint16, 3: np.int16, 4: np.uint32, 5: np.int32,
          6: np.float32, 7: np.bool_, 10: np.uint64, 11: np.int64, 12: np.float64}
_STRING, _ARRAY = 8, 9


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # numpy order: outermost dimension first ([out, in] for a weight)
    ggml_type: GGMLQuantizationType
    offset: int  # absolute byte offset in the file
    nbytes: int


class _Cursor:
    def __init__(self, buf: memoryview, path: Path) -> None:
        self.buf, self.pos, self.path = buf, 0, path

    def take(self, n: int) -> memoryview:
        end = self.pos + n
        if n < 0 or end > len(self.buf):
            raise ModelError(f"{self.path} is truncated or corrupt: its header needs bytes up to "
                             f"{end} but the file has {len(self.buf)}", "download the file again")
        out = self.buf[self.pos:end]
        self.pos = end
        return out

    def scalar(self, kind: int) -> Any:
        fmt = _SCALARS[kind]
        return struct.unpack(fmt, self.take(struct.calcsize(fmt)))[0]

    def string(self) -> str:
        raw = self.take(self.scalar(10))
        try:
            return bytes(raw).decode("utf-8")
        except UnicodeDecodeError:
            return bytes(raw).decode("utf-8", errors="replace")

    def value(self, kind: int) -> Any:
        if kind in _SCALARS:
            return self.scalar(kind)
        if kind == _STRING:
            return self.string()
        if kind == _ARRAY:
            item_kind, count = self.scalar(4), self.scalar(10)
            if item_kind in _NUMPY:
                dtype = np.dtype(_NUMPY[item_kind])
                return np.frombuffer(self.take(count * dtype.itemsize), dtype=dtype).tolist()
            return [self.value(item_kind) for _ in range(count)]
        raise ModelError(f"{self.path} is corrupt: unknown metadata value type {kind}",
                         "download the file again")


class GGUFFile:
    """An open GGUF file. `metadata` holds plain Python values; tensor bytes stay on disk."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise ModelError(f"model file not found: {self.path}", "check the path")
        size = self.path.stat().st_size
        if size < 24:
            raise ModelError(f"{self.path} is not a GGUF file: it is only {size} bytes long")
        self._map = np.memmap(self.path, dtype=np.uint8, mode="r")
        cur = _Cursor(memoryview(self._map), self.path)
        magic = bytes(cur.take(4))
        if magic != b"GGUF":
            raise ModelError(f"{self.path} is not a GGUF file (it starts with {magic!r})",
                             "pass a .gguf file or a Hugging Face model directory")
        self.version = cur.scalar(4)
        if self.version not in (2, 3):
            raise ModelError(f"{self.path} uses GGUF version {self.version}; blockmem reads versions 2 "
                             "and 3", "convert it again with a current llama.cpp")
        n_tensors, n_kv = cur.scalar(10), cur.scalar(10)
        self.metadata: dict[str, Any] = {}
        for _ in range(n_kv):
            key = cur.string()
            self.metadata[key] = cur.value(cur.scalar(4))
        infos = [self._tensor_header(cur) for _ in range(n_tensors)]
        align = int(self.metadata.get("general.alignment", 32))
        data_start = (cur.pos + align - 1) // align * align
        self.tensors: dict[str, TensorInfo] = {}
        for name, shape, ggml_type, rel in infos:
            info = self._tensor_info(name, shape, ggml_type, data_start + rel)
            if info.offset + info.nbytes > size:
                raise ModelError(f"{self.path} is truncated: tensor {name!r} ends at byte "
                                 f"{info.offset + info.nbytes} but the file has {size} bytes",
                                 "download the file again")
            self.tensors[name] = info

    def _tensor_header(self, cur: _Cursor) -> tuple[str, tuple[int, ...], int, int]:
        name = cur.string()
        n_dims = cur.scalar(4)
        if n_dims > 8:
            raise ModelError(f"{self.path} is corrupt: tensor {name!r} claims {n_dims} dimensions")
        dims = tuple(cur.scalar(10) for _ in range(n_dims))
        return name, tuple(reversed(dims)), cur.scalar(4), cur.scalar(10)

    def _tensor_info(self, name: str, shape: tuple[int, ...], type_id: int, offset: int) -> TensorInfo:
        try:
            ggml_type = GGMLQuantizationType(type_id)
            block, type_size = GGML_QUANT_SIZES[ggml_type]
        except (ValueError, KeyError):
            raise ModelError(f"{self.path}: tensor {name!r} has unknown data type id {type_id}",
                             "the file may come from a newer llama.cpp than the installed `gguf` "
                             "package; try `pip install -U gguf`") from None
        count = int(np.prod(shape, dtype=np.int64)) if shape else 1
        if shape and shape[-1] % block:
            raise ModelError(f"{self.path} is corrupt: tensor {name!r} row length {shape[-1]} is not "
                             f"a multiple of the {ggml_type.name} block size {block}")
        return TensorInfo(name, shape, ggml_type, offset, count // block * type_size)

    def raw(self, name: str) -> np.ndarray:
        """The tensor's bytes as a read-only uint8 view of the memory map."""
        info = self.tensors[name]
        return self._map[info.offset:info.offset + info.nbytes]

    def string_list(self, key: str) -> list[str]:
        value = self.metadata.get(key, [])
        return list(value)
