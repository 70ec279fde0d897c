"""`nosa` (NOSA style, training-free): the block budget split into query-agnostic and
query-aware parts, so consecutive decode steps reuse most blocks and fewer bytes move."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from blockmem.attention.base import LayerSpec
from blockmem.attention.blocksparse import BlockSparseMethod
from blockmem.attention.sparse import Held, top_blocks, top_blocks_besides
from blockmem.errors import ConfigError
from blockmem.memory.store import BlockStore

IMPORTANCE = ("mass", "vnorm")


@dataclass(frozen=True)
class NosaMethod(BlockSparseMethod):
    """Reads sinks + window + `agnostic_fraction` of the top-k blocks chosen by an importance
    that does not depend on the current query, and the rest as `blocksparse` chooses them.
    importance="mass": the attention mass the block's tokens received while in the window;
    "vnorm": the mean norm of its values (a proxy needing no attention scores)."""

    name: ClassVar[str] = "nosa"
    agnostic_fraction: float = 0.5
    importance: str = "mass"

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 <= self.agnostic_fraction <= 1.0:
            raise ConfigError(f"nosa: agnostic-fraction must be in [0, 1], got {self.agnostic_fraction}",
                              "the share of the top-k blocks chosen without the query; the default is 0.5")
        if self.importance not in IMPORTANCE:
            raise ConfigError(f"nosa: unknown importance {self.importance!r}", f"use one of {', '.join(IMPORTANCE)}")

    @property
    def needs_scores(self) -> bool:  # type: ignore[override]
        return self.importance == "mass"

    def summarize(self, keys: torch.Tensor, values: torch.Tensor, scores: torch.Tensor) -> dict[str, torch.Tensor]:
        importance = scores.sum(dim=1) if self.importance == "mass" else values.float().norm(dim=-1).mean(dim=1)
        return {**super().summarize(keys, values, scores), "importance": importance}  # importance: [Hkv]

    def read_ahead(self, store: BlockStore, spec: LayerSpec) -> list[int]:
        """The query-agnostic blocks of every head: known before any query arrives."""
        agnostic_k = round(self.topk * self.agnostic_fraction)
        if not agnostic_k:
            return []
        return sorted(set(top_blocks(store.summary("importance"), agnostic_k).flatten().tolist()))

    def select(self, q: torch.Tensor, store: BlockStore, spec: LayerSpec, length: int,
               held: Held | None = None) -> torch.Tensor:
        agnostic_k = round(self.topk * self.agnostic_fraction)
        agnostic = top_blocks(store.summary("importance"), agnostic_k)  # [Hkv, a]
        return top_blocks_besides(agnostic, self.block_scores(q, store, spec), self.topk - agnostic_k)
