"""The one attention interface between the model and the methods that keep and read keys.

The model computes q, k, v for a chunk of tokens and hands them, not yet rotated, to the layer's
`LayerCache`; the method decides where keys live, which ones each query reads and at which
positions they are rotated. The model never branches on the method in use.

Lifecycle: `method.new_cache(specs, ...)` once per sequence -> for each forward chunk, every
layer calls `cache.layers[i].attend(q, k, v, rotary, cache.length)` -> `cache.advance(T)`.
Lengths are Python integers owned by the cache, never inferred from tensor contents.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from blockmem.attention.telemetry import Telemetry
from blockmem.model.rope import Rotary


@dataclass(frozen=True)
class LayerSpec:
    """What an attention method needs to know about one layer."""

    index: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    scale: float
    window: int | None  # sliding window of this layer (None: full attention)


class LayerCache(ABC):
    """One layer's keys and values for one sequence, kept the way its method wants."""

    @abstractmethod
    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rotary: Rotary, start: int) -> torch.Tensor:
        """Write this chunk's k/v, attend, and return the output.

        q: [B, Hq, T, D], k and v: [B, Hkv, T, D], all before RoPE, for positions start..start+T-1.
        Returns [B, Hq, T, D] in q's dtype.
        """

    @abstractmethod
    def nbytes(self) -> int:
        """Bytes of key/value storage this layer holds now."""

    def export_state(self) -> tuple[dict[str, int], dict[str, torch.Tensor]]:
        """Integers and tensors that, with the blocks in the tiers, restore this layer exactly."""
        raise NotImplementedError(f"{type(self).__name__} cannot be saved")

    def import_state(self, ints: dict[str, int], arrays: dict[str, torch.Tensor]) -> None:
        """Restore what `export_state` returned (into a new, empty layer)."""
        raise NotImplementedError(f"{type(self).__name__} cannot be restored")


class KVCache:
    """All layers' state for one sequence under one method (and its selection telemetry)."""

    def __init__(self, layers: list[LayerCache], telemetry: Telemetry | None = None, tiers: Any = None) -> None:
        self.layers = layers
        self.telemetry = telemetry
        self.tiers = tiers  # memory.tiers.Tiers holding the blocks of block-memory methods, or None
        self.length = 0  # tokens written so far

    def settle(self) -> None:
        """Drop transient read caches (working sets), so what follows depends only on the stored
        memory: done at document boundaries and before saving, which makes a reopened or
        extended memory compute exactly what the in-process one does."""
        for layer in self.layers:
            settle = getattr(layer, "settle", None)
            if settle is not None:
                settle()

    def close(self) -> None:
        """Release spill files; the cache must not be used afterwards."""
        if self.tiers is not None:
            self.tiers.close()

    def advance(self, n: int) -> None:
        self.length += n

    def nbytes(self) -> int:
        return sum(layer.nbytes() for layer in self.layers)


class AttentionMethod(ABC):
    """A policy for keeping keys and choosing which ones each query reads."""

    name: ClassVar[str]
    # options a saved memory's header may lack, with the values such a memory was built with
    saved_before: ClassVar[dict[str, Any]] = {}

    @abstractmethod
    def new_cache(self, specs: list[LayerSpec], device: torch.device, dtype: torch.dtype,
                  tiers: Any = None, base: Any = None) -> KVCache:
        """Empty state for one new sequence. `tiers` (memory.tiers.TierConfig) sets the budgets
        of methods that keep blocks; `base` maps the blocks of a saved memory."""

    def context_limit(self, model_limit: int) -> int | None:
        """The longest sequence this method serves on a model trained to `model_limit` tokens
        (None: bounded only by memory)."""
        return model_limit

    def for_context(self, tokens: int | None) -> AttentionMethod:
        """The method as it serves a new sequence that starts with a `tokens`-token prompt (None:
        length unknown, e.g. a memory that will be extended): itself, unless a setting is decided
        by the prompt's length."""
        return self

    def idle_options(self) -> tuple[tuple[str, ...], str, str]:
        """Options that change nothing given the others: their names, what they would shape, and
        the fix. `create_method` refuses them when given; a saved header records them all."""
        return (), "", ""

    def describe(self) -> dict[str, Any]:
        """The method's name and settings, for reports and `--json`."""
        return {"method": self.name}
