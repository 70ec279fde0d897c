"""Building blocks of the decoder: a linear layer with a CPU fast path, RMSNorm, gated MLP.

On CPU, decoding one token is a chain of matrix-vector products bound by how fast weights
stream from memory. `F.linear` on the usual [out, in] layout reaches ~10 GB/s on a 2-core
EPYC; oneDNN's prepacked layout reaches ~20 GB/s and is faster for prefill too. `Linear.pack()`
switches a layer to it; the plain path stays as the reference (tests compare the two). A layer
can also hold a 4-bit copy (`model/int4.py`) that serves the few-row calls of decoding.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from blockmem.config import Activation
from blockmem.model import int4


class Linear(nn.Module):
    """y = x W^T + b. weight: [out, in]."""

    def __init__(self, in_features: int, out_features: int, bias: bool) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight: nn.Parameter | None = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False) if bias else None
        self.packed: torch.Tensor | None = None  # oneDNN-blocked copy of weight, when packed
        self.int4: int4.Int4Weight | None = None  # 4-bit copy for decode-sized calls (--dtype int4)

    def pack(self) -> bool:
        """Switch to the prepacked oneDNN weight; returns False where that path is unavailable."""
        if self.weight is None or self.weight.device.type != "cpu" or not _onednn_linear_available():
            return self.packed is not None
        try:
            self.packed = _onednn_pack(self.weight.detach())
        except RuntimeError:  # oneDNN refuses some dtypes on some CPUs (bfloat16 without AVX-512)
            return False  # F.linear serves instead
        self.weight = None  # the packed copy replaces it
        return True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        if self.int4 is not None and flat.shape[0] <= int4.MAX_ROWS:
            out = self.int4.matmul(flat.to(torch.bfloat16)).to(x.dtype)
            if self.bias is not None:
                out = out + self.bias
        elif self.packed is not None:
            out = torch.ops.mkldnn._linear_pointwise(flat, self.packed, self.bias, "none", [], "")
        else:
            return F.linear(x, self.weight, self.bias)
        return out.reshape(*x.shape[:-1], self.out_features)


def _onednn_pack(weight: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._reorder_linear_weight(weight, None)


def _onednn_linear_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


class Embedding(nn.Module):
    """Token embedding table [vocab, hidden], also the output head when embeddings are tied.

    `pack()` speeds up the tied head on CPU. In float32 it keeps one transposed copy
    [hidden, vocab]: `x @ weight_t` streams as fast as a packed head and lookups gather columns,
    so the largest tensor is not held twice. In bfloat16/float16 that matmul has no fast kernel
    (3x slower than oneDNN's), so the table stays and the head gets a packed copy.
    """

    def __init__(self, vocab: int, hidden: int) -> None:
        super().__init__()
        self.weight: nn.Parameter | None = nn.Parameter(torch.empty(vocab, hidden), requires_grad=False)
        self.weight_t: torch.Tensor | None = None
        self.head = Linear(hidden, vocab, bias=False)
        self.head.weight = None  # filled by pack() in half precision

    @property
    def table(self) -> torch.Tensor:
        """Whichever copy is held (for dtype and device)."""
        return self.weight if self.weight is not None else self.weight_t

    def pack(self) -> bool:
        if self.weight is None or self.weight.device.type != "cpu":
            return self.weight_t is not None or self.head.packed is not None
        if self.weight.dtype != torch.float32:
            self.head.weight = self.weight
            return self.head.pack()
        self.weight_t = self.weight.detach().t().contiguous()
        self.weight = None
        return True

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.weight_t is None:
            return F.embedding(ids, self.weight)
        rows = self.weight_t.index_select(1, ids.reshape(-1)).t()
        return rows.reshape(*ids.shape, self.weight_t.shape[0])

    def as_head(self, x: torch.Tensor) -> torch.Tensor:
        """Logits through the tied table: x [..., hidden] -> [..., vocab]."""
        if self.head.packed is not None:
            return self.head(x)
        return F.linear(x, self.weight) if self.weight_t is None else x @ self.weight_t


class RMSNorm(nn.Module):
    """x / rms(x) * weight, computed in float32. The weight is the effective multiplier: loaders
    fold in Gemma's (1 + w) convention, so one module serves every family."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(dim), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x.float(), self.weight.shape, self.weight, self.eps).to(x.dtype)


class GatedMLP(nn.Module):
    """down(act(gate(x)) * up(x)), with gate and up fused into one [2I, H] projection."""

    def __init__(self, hidden: int, intermediate: int, activation: Activation, bias: bool) -> None:
        super().__init__()
        self.intermediate = intermediate
        self.gate_up = Linear(hidden, 2 * intermediate, bias)
        self.down = Linear(intermediate, hidden, bias)
        self.activation = activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).split(self.intermediate, dim=-1)
        if self.activation is Activation.SILU:
            gate = F.silu(gate)
        else:
            gate = F.gelu(gate, approximate="tanh")
        return self.down(gate * up)
