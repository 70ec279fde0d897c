"""GGUF tensor decoding to float32.

The `gguf` package's numpy decoders are the reference and cover every type; the simple block
formats get vectorised torch versions here because numpy takes seconds on a large Q8_0
embedding. tests/test_dequant.py checks each fast path bit-for-bit against the reference.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as Q
from gguf.quants import dequantize as reference_dequantize

from blockmem.errors import ModelError


def _f16(blocks: torch.Tensor, start: int) -> torch.Tensor:
    # blocks: [N, bytes] uint8 -> [N, 1] float32 from the little-endian fp16 at `start`
    return blocks[:, start:start + 2].contiguous().view(torch.float16).float()


def _low_high(qs: torch.Tensor) -> torch.Tensor:
    # qs: [N, 16] uint8 of packed nibbles -> [N, 32]: low nibbles first, then high ones
    return torch.cat([qs & 0x0F, qs >> 4], dim=1).float()


def _fifth_bits(qh: torch.Tensor) -> torch.Tensor:
    # qh: [N, 4] uint8 holding 32 bits, bit j is the fifth bit of element j -> [N, 32] of 0/16
    bits = qh.long().unsqueeze(-1) >> torch.arange(8)
    return ((bits & 1).reshape(qh.shape[0], 32) * 16).float()


def _q8_0(b: torch.Tensor) -> torch.Tensor:
    return _f16(b, 0) * b[:, 2:].contiguous().view(torch.int8).float()


def _q4_0(b: torch.Tensor) -> torch.Tensor:
    return _f16(b, 0) * (_low_high(b[:, 2:]) - 8)


def _q4_1(b: torch.Tensor) -> torch.Tensor:
    return _f16(b, 0) * _low_high(b[:, 4:]) + _f16(b, 2)


def _q5_0(b: torch.Tensor) -> torch.Tensor:
    return _f16(b, 0) * (_low_high(b[:, 6:]) + _fifth_bits(b[:, 2:6]) - 16)


def _q5_1(b: torch.Tensor) -> torch.Tensor:
    return _f16(b, 0) * (_low_high(b[:, 8:]) + _fifth_bits(b[:, 4:8])) + _f16(b, 2)


_FAST = {Q.Q8_0: _q8_0, Q.Q4_0: _q4_0, Q.Q4_1: _q4_1, Q.Q5_0: _q5_0, Q.Q5_1: _q5_1}
_PLAIN = {Q.F32: torch.float32, Q.F16: torch.float16, Q.BF16: torch.bfloat16}


_CHUNK_BLOCKS = 1 << 15  # blocks decoded at a time, so temporaries stay in cache


def dequantize(raw: np.ndarray, ggml_type: Q, shape: tuple[int, ...], name: str = "tensor") -> torch.Tensor:
    """Decode a tensor's raw bytes (uint8) into a new float32 tensor of `shape` (numpy order)."""
    with warnings.catch_warnings():  # `raw` is a read-only memory map; we only read from it
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        data = torch.from_numpy(raw)
    if ggml_type in _PLAIN:
        return data.view(_PLAIN[ggml_type]).to(torch.float32, copy=True).reshape(shape)
    if ggml_type not in _FAST:
        return reference_decode(raw, ggml_type, shape, name)
    block, type_size = GGML_QUANT_SIZES[ggml_type]
    blocks = data.view(-1, type_size)
    out = torch.empty(blocks.shape[0], block)
    for start in range(0, blocks.shape[0], _CHUNK_BLOCKS):
        out[start:start + _CHUNK_BLOCKS] = _FAST[ggml_type](blocks[start:start + _CHUNK_BLOCKS])
    return out.reshape(shape)


def reference_decode(raw: np.ndarray, ggml_type: Q, shape: tuple[int, ...], name: str = "tensor") -> torch.Tensor:
    """Decode with the `gguf` package (slow, covers every type it knows)."""
    try:
        values = reference_dequantize(np.ascontiguousarray(raw), ggml_type)
    except NotImplementedError:
        raise ModelError(f"tensor {name!r} uses GGUF type {ggml_type.name}, which the installed `gguf` "
                         "package cannot decode", "use a file quantized to a common type (F16, Q8_0, "
                         "Q4_K_M, ...) or upgrade `gguf`") from None
    return torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32)).reshape(shape)
