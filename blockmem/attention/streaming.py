"""`streaming` (StreamingLLM): the first n_init tokens (attention sinks) and the last n_local."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from blockmem.attention.base import LayerSpec
from blockmem.attention.sparse import Held, Position, SparseMethod
from blockmem.memory.store import BlockStore


@dataclass(frozen=True)
class StreamingMethod(SparseMethod):
    """Reads sinks and a recent window; older tokens are dropped, so memory stays bounded.
    Positions are compacted by default (the window sits right after the sinks), which keeps
    every distance inside the trained range."""

    name: ClassVar[str] = "streaming"
    keeps_blocks: ClassVar[bool] = False
    topk: int = 0
    position: Position | str = Position.COMPACTED

    def summarize(self, keys: torch.Tensor, values: torch.Tensor, scores: torch.Tensor) -> dict[str, torch.Tensor]:
        return {}

    def select(self, q: torch.Tensor, store: BlockStore, spec: LayerSpec, length: int,
               held: Held | None = None) -> torch.Tensor:
        raise AssertionError("streaming keeps no blocks to select")
