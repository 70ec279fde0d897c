"""`dense`: every query reads every earlier key (within a layer's sliding window, if it has one).

This is the correctness oracle for every sparse method. Keys are stored rotated at their true
positions in a buffer that grows by doubling, so a decode step never copies the cache.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from blockmem.attention.base import AttentionMethod, KVCache, LayerCache, LayerSpec
from blockmem.attention.merge import merge, partial_attention
from blockmem.errors import ConfigError
from blockmem.model.rope import Rotary


def causal_mask(start: int, length: int, key_start: int, window: int | None, device: torch.device) -> torch.Tensor:
    """[length, start + length - key_start] bool: True where query start+i may read key key_start+j."""
    q_pos = torch.arange(start, start + length, device=device)[:, None]
    k_pos = torch.arange(key_start, start + length, device=device)[None, :]
    allowed = k_pos <= q_pos
    if window is not None:
        allowed &= q_pos - k_pos < window
    return allowed


def decode_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scale: float) -> torch.Tensor:
    """One query step. q: [B, Hq, 1, D]; keys/values: [B, Hkv, S, D] -> [B, Hq, 1, D].

    The G query heads sharing a key/value head become G rows of one query block, so no key or
    value is ever repeated (SDPA's enable_gqa is 5x slower for bfloat16 single queries here).
    """
    batch, heads, _, dim = q.shape
    kv_heads = keys.shape[1]
    grouped = q.reshape(batch, kv_heads, heads // kv_heads, dim)
    out = F.scaled_dot_product_attention(grouped, keys, values, scale=scale)
    return out.reshape(batch, heads, 1, dim)


class DenseLayer(LayerCache):
    """Keys rotated at true positions in a buffer [B, Hkv, capacity, D] that grows by doubling.
    A sliding-window layer drops keys no future query can see, so its memory stays bounded;
    `offset` is the absolute position held in buffer slot 0."""

    def __init__(self, spec: LayerSpec, device: torch.device, dtype: torch.dtype) -> None:
        self.spec = spec
        self.keys = torch.empty(0, device=device, dtype=dtype)  # [B, Hkv, capacity, D]
        self.values = torch.empty(0, device=device, dtype=dtype)
        self.offset = 0
        self.end = 0  # absolute position after the last key written

    def _reserve(self, k: torch.Tensor, needed: int) -> None:
        capacity = self.keys.shape[2] if self.keys.dim() == 4 else 0
        if needed <= capacity:
            return
        size = max(needed, 2 * capacity, 256)
        shape = (k.shape[0], k.shape[1], size, k.shape[3])
        keys, values = k.new_empty(shape), k.new_empty(shape)
        held = self.end - self.offset
        if held:
            keys[:, :, :held] = self.keys[:, :, :held]
            values[:, :, :held] = self.values[:, :, :held]
        self.keys, self.values = keys, values

    def _trim(self) -> None:
        """Drop keys before the next query's window once that frees at least a window's worth."""
        window = self.spec.window
        if window is None:
            return
        keep_from = self.end - window + 1
        drop = keep_from - self.offset
        if drop < max(window, 256):
            return
        held = self.end - keep_from
        self.keys[:, :, :held] = self.keys[:, :, drop:drop + held].clone()
        self.values[:, :, :held] = self.values[:, :, drop:drop + held].clone()
        self.offset = keep_from

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rotary: Rotary, start: int) -> torch.Tensor:
        length = q.shape[2]
        end = start + length
        q, k = rotary.rotate(q, start), rotary.rotate(k, start)
        self._reserve(k, end - self.offset)
        self.keys[:, :, start - self.offset:end - self.offset] = k
        self.values[:, :, start - self.offset:end - self.offset] = v
        self.end = end
        window = self.spec.window
        key_start = 0 if window is None else max(0, start - window + 1)
        keys = self.keys[:, :, key_start - self.offset:end - self.offset]
        values = self.values[:, :, key_start - self.offset:end - self.offset]
        out = self._attend(q, keys, values, start, key_start, length)
        self._trim()
        return out

    def _attend(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, start: int, key_start: int,
                length: int) -> torch.Tensor:
        window, scale = self.spec.window, self.spec.scale
        if length == 1:
            return decode_attention(q, keys, values, scale)
        if window is None and start > 0 and q.device.type == "cpu":
            # Earlier keys need no mask, the chunk's own keys a plain causal one: two fast CPU
            # kernels merged exactly, instead of one masked kernel that cannot skip anything.
            # (GPU SDPA kernels handle the mask well; the split stays a CPU path.)
            return merge([partial_attention(q, keys[:, :, :start], values[:, :, :start], scale, causal=False),
                          partial_attention(q, keys[:, :, start:], values[:, :, start:], scale, causal=True)])[0]
        causal = start == 0 and (window is None or window >= length)
        mask = None if causal else causal_mask(start, length, key_start, window, q.device)
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, is_causal=causal, scale=scale,
                                              enable_gqa=self.spec.num_heads != self.spec.num_kv_heads)

    def export_state(self) -> tuple[dict[str, int], dict[str, torch.Tensor]]:
        held = self.end - self.offset
        if self.keys.dim() != 4:
            return {"offset": 0, "end": 0}, {}
        return {"offset": self.offset, "end": self.end}, {"keys": self.keys[:, :, :held], "values": self.values[:, :, :held]}

    def import_state(self, ints: dict[str, int], arrays: dict[str, torch.Tensor]) -> None:
        self.offset, self.end = ints["offset"], ints["end"]
        if arrays:
            device, dtype = self.keys.device, self.keys.dtype
            self.keys, self.values = (arrays["keys"].to(device, dtype), arrays["values"].to(device, dtype))

    def nbytes(self) -> int:
        held = (self.end - self.offset) * self.keys.shape[1] * self.keys.shape[3] if self.keys.dim() == 4 else 0
        return 2 * held * self.keys.element_size()


class DenseMethod(AttentionMethod):
    """Full attention over the whole sequence, limited to the model's trained context."""

    name = "dense"

    def new_cache(self, specs: list[LayerSpec], device: torch.device, dtype: torch.dtype,
                  tiers: Any = None, base: Any = None) -> KVCache:
        if tiers is not None and tiers.tiered:
            raise ConfigError("memory budgets apply to block-memory methods; dense keeps every key on the device",
                              "use a method such as --method infllm with --ram-budget")
        return KVCache([DenseLayer(spec, device, dtype) for spec in specs])
