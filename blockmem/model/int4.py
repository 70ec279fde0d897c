"""4-bit weights for CPU decode (`--dtype int4`).

Decoding one token on CPU streams every weight from memory once, so the bytes per weight set the
speed: float32 reads 4 bytes, bfloat16 2, this path about 0.56 (4 bits plus a bfloat16 scale and
zero per group of 32). Weights are quantized round-to-nearest per group of 32 input channels
with an affine grid, w ~ (q - 8) * scale + zero, q in 0..15 — the layout of torch's
`_weight_int4pack_mm_for_cpu` kernel, which takes bfloat16 activations. GGUF Q4_0, Q4_1 and Q4_K
tensors already are such grids (per group of 32 along a row), so their float32 decode is
recovered exactly, up to rounding each group's scale and zero to bfloat16; tensors stored with
more bits (Q5_0, Q6_K, Q8_0, bfloat16) lose precision.

The kernel is fast for a few rows and slower than oneDNN's bfloat16 GEMM for many (2.5x at 1024
rows on the 2-core EPYC), so a quantized layer keeps its packed bfloat16 weight too and uses the
4-bit copy only for calls of at most `MAX_ROWS` rows: decode steps, not prefill chunks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

GROUP = 32
MAX_ROWS = 4  # at 4 rows the two kernels tie; above, the bfloat16 GEMM wins


def available() -> bool:
    """Whether this torch build has the CPU 4-bit kernels."""
    return hasattr(torch, "_weight_int4pack_mm_for_cpu") and hasattr(torch, "_convert_weight_to_int4pack_for_cpu")


def supports(weight: torch.Tensor) -> bool:
    """Whether `weight` [out, in] can be quantized: on CPU, whole groups of input channels, and
    output rows in multiples of 16 (the kernel's tile). Other layers stay in bfloat16."""
    return (weight.device.type == "cpu" and weight.dim() == 2 and weight.shape[1] % GROUP == 0
            and weight.shape[0] % 16 == 0)


def quantize(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """weight [N, K] -> (q [N, K] int32 in 0..15, scale [N, K/GROUP], zero [N, K/GROUP]) with
    w ~ (q - 8) * scale + zero; scale and zero are already rounded to bfloat16 (as stored), and q
    is chosen against the rounded values.

    A group whose values already lie on a grid of at most 16 evenly spaced levels (a GGUF Q4_0,
    Q4_1 or Q4_K tensor decoded to float) keeps that grid, whichever levels it uses; any other
    group is quantized round-to-nearest over its range (16 levels from its minimum to maximum)."""
    n, k = weight.shape
    groups = weight.detach().float().reshape(n, k // GROUP, GROUP)
    low, high = groups.amin(-1), groups.amax(-1)
    span = high - low
    scale = torch.where(span > 0, span / 15, torch.full_like(span, 2.0 ** -100))  # constant: zero ~ the value
    gaps = groups.sort(-1).values.diff(dim=-1)
    gaps = torch.where(gaps > 1e-3 * span.unsqueeze(-1), gaps, torch.full_like(gaps, torch.inf))
    step = gaps.amin(-1)  # the smallest gap between distinct values: the grid step, if there is one
    steps = (groups - low.unsqueeze(-1)) / step.unsqueeze(-1)
    on_grid = ((steps - steps.round()).abs().amax(-1) < 1e-2) & (span / step <= 15.01) & torch.isfinite(step)
    scale = torch.where(on_grid, step, scale).to(torch.bfloat16).float()
    zero = (low + 8 * scale).to(torch.bfloat16).float()
    q = torch.round((groups - zero.unsqueeze(-1)) / scale.unsqueeze(-1) + 8).clamp_(0, 15)
    return q.reshape(n, k).to(torch.int32), scale, zero


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """The float32 weight a quantized one stands for (the reference the kernel is tested against)."""
    n, k = q.shape
    groups = (q.float().reshape(n, k // GROUP, GROUP) - 8) * scale.unsqueeze(-1) + zero.unsqueeze(-1)
    return groups.reshape(n, k)


@dataclass
class Int4Weight:
    """A weight [out, in] in the kernel's packed layout."""

    packed: torch.Tensor  # [out, in / 2] uint8
    scale_zero: torch.Tensor  # [in / GROUP, out, 2] bfloat16
    out_features: int

    @classmethod
    def from_float(cls, weight: torch.Tensor) -> Int4Weight:
        q, scale, zero = quantize(weight)
        packed = torch._convert_weight_to_int4pack_for_cpu(q, 1)
        scale_zero = torch.stack([scale.t(), zero.t()], dim=-1).to(torch.bfloat16).contiguous()
        return cls(packed, scale_zero, weight.shape[0])

    @property
    def nbytes(self) -> int:
        return self.packed.numel() * self.packed.element_size() + self.scale_zero.numel() * 2

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """x [M, in] bfloat16 -> x @ W^T [M, out] bfloat16."""
        return torch._weight_int4pack_mm_for_cpu(x, self.packed, GROUP, self.scale_zero)
