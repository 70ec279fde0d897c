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
    """cos/sin for a run of positions, computed when first asked for and kept for the few calls
    that reuse them (the layers of one step ask for the same positions). No table of every
    position is kept: one grown by doubling held ~1 KB per context token (256 MB at 256K).

    The sin carries rotate-half's sign (-sin on the first half), so a rotation is one roll and
    three elementwise ops.
    """

    def __init__(self, rope: RopeConfig, head_dim: int) -> None:
        self.inv_freq = inverse_frequencies(rope, head_dim)
        self._slices: dict[tuple[int, int, torch.device, torch.dtype], tuple[torch.Tensor, torch.Tensor]] = {}

    def table(self, start: int, length: int, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, signed sin: [length, head_dim] for positions start..start+length-1."""
        key = (start, length, device, dtype)
        found = self._slices.get(key)
        if found is not None:
            return found
        if len(self._slices) >= 16:  # positions move on every step; keep only recent slices
            self._slices.clear()
        positions = torch.arange(start, start + length, dtype=torch.float32, device=device)
        freqs = positions[:, None] * self.inv_freq.to(device)[None, :]
        sin = freqs.sin()
        found = self._slices[key] = (torch.cat([freqs, freqs], dim=-1).cos().to(dtype),
                                     torch.cat([-sin, sin], dim=-1).to(dtype))
        return found

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
