"""Rotary position embeddings: inverse frequencies per scaling kind, and a cos/sin table.

Rotation uses the "rotate half" layout of Hugging Face checkpoints; GGUF loaders undo
llama.cpp's interleaving permutation so one layout serves both. The table is a plain object
(not module buffers) so models can be built on the meta device, and attention methods can
rotate keys at any position they choose (InfLLM places memory at a fixed distance).
"""

from __future__ import annotations

import math

import torch

from blockmem.config import RopeConfig, RopeKind


def inverse_frequencies(rope: RopeConfig, head_dim: int) -> torch.Tensor:
    """[head_dim // 2] float32, in the same float operations as the reference implementation."""
    # Explicitly on CPU: models are built under `torch.device("meta")`, this table must be real.
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device="cpu").float() / head_dim
    inv_freq = 1.0 / (rope.theta ** exponents)
    if rope.freq_divisors is not None:
        return inv_freq / torch.tensor(rope.freq_divisors, dtype=torch.float32, device="cpu")
    if rope.kind is RopeKind.LINEAR:
        return inv_freq / rope.factor
    if rope.kind is RopeKind.LLAMA3:
        return _llama3(inv_freq, rope)
    return inv_freq


def _llama3(inv_freq: torch.Tensor, rope: RopeConfig) -> torch.Tensor:
    # Long wavelengths are slowed by `factor`, short ones kept, the band between blended.
    old_context = rope.original_max_position
    low_wavelen = old_context / rope.low_freq_factor
    high_wavelen = old_context / rope.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / rope.factor, inv_freq)
    smooth = (old_context / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
    blended = (1 - smooth) * scaled / rope.factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return torch.where(medium, blended, scaled)


class Rotary:
    """cos/sin for positions 0..n-1, grown on demand (by doubling) on the device of first use.

    The sin table carries rotate-half's sign (-sin on the first half), so a rotation is one
    roll and three elementwise ops; the layers of a step share the few slices they fetch.
    """

    def __init__(self, rope: RopeConfig, head_dim: int) -> None:
        self.inv_freq = inverse_frequencies(rope, head_dim)
        self._cos = self._sin = torch.empty(0, device="cpu")
        self._slices: dict[tuple[int, int, torch.device, torch.dtype], tuple[torch.Tensor, torch.Tensor]] = {}

    def _grow(self, needed: int, device: torch.device) -> None:
        size = max(needed, 2 * self._cos.shape[0], 256)
        positions = torch.arange(size, dtype=torch.float32, device=device)
        freqs = positions[:, None] * self.inv_freq.to(device)[None, :]
        self._cos = torch.cat([freqs, freqs], dim=-1).cos()
        self._sin = torch.cat([-freqs.sin(), freqs.sin()], dim=-1)

    def table(self, start: int, length: int, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, signed sin: [length, head_dim] for positions start..start+length-1."""
        key = (start, length, device, dtype)
        if key in self._slices:
            return self._slices[key]
        if start + length > self._cos.shape[0] or self._cos.device != device:
            self._grow(start + length, device)
        if len(self._slices) >= 16:  # positions move on every step; keep only recent slices
            self._slices.clear()
        self._slices[key] = (self._cos[start:start + length].to(dtype), self._sin[start:start + length].to(dtype))
        return self._slices[key]

    def rotate(self, x: torch.Tensor, start: int) -> torch.Tensor:
        """x: [..., T, D] at positions start..start+T-1 -> rotated, same shape and dtype."""
        cos, sin = self.table(start, x.shape[-2], x.device, x.dtype)
        return apply_rotary(x, cos, sin)

    def rotate_at(self, x: torch.Tensor, position: int) -> torch.Tensor:
        """Every row of x [..., T, D] rotated as if it sat at `position`."""
        cos, sin = self.table(position, 1, x.device, x.dtype)
        return apply_rotary(x, cos, sin)

    def unrotate(self, x: torch.Tensor, start: int) -> torch.Tensor:
        """The inverse of `rotate(x, start)`: keys back to their position-free form."""
        cos, sin = self.table(start, x.shape[-2], x.device, x.dtype)
        return x * cos - x.roll(x.shape[-1] // 2, dims=-1) * sin


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """x: [..., T, D]; cos, signed_sin: [T, D]. Equals x*cos + rotate_half(x)*sin exactly:
    rotate_half(x) = cat(-x2, x1) = roll(x, D/2) with the sign moved into the table."""
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * signed_sin
