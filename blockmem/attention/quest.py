"""`quest` (Quest): sinks + window + the top-k blocks by an upper bound of q·k from per-block,
per-channel minimum and maximum keys; true positions."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from blockmem.attention.base import LayerSpec
from blockmem.attention.sparse import Held, SparseMethod, grouped_queries, top_blocks
from blockmem.memory.store import BlockStore


@dataclass(frozen=True)
class QuestMethod(SparseMethod):
    """A block's bound for a query q is sum_d max(q_d * min_d, q_d * max_d) >= q·k for every key
    k in it. That equals relu(q)·max + min(q, 0)·min, linear in q, so the bound summed over a
    GQA group's heads and the chunk's queries is two dot products per block. One selection per
    KV head."""

    name: ClassVar[str] = "quest"
    n_init: int = 64
    block_size: int = 64
    topk: int = 32

    def summarize(self, keys: torch.Tensor, values: torch.Tensor, scores: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"kmin": keys.float().amin(dim=1), "kmax": keys.float().amax(dim=1)}  # [Hkv, D] each

    def select(self, q: torch.Tensor, store: BlockStore, spec: LayerSpec, length: int,
               held: Held | None = None) -> torch.Tensor:
        rows = grouped_queries(q, spec.num_kv_heads).float()  # [Hkv, G*T, D]
        positive, negative = rows.clamp(min=0).sum(dim=1), rows.clamp(max=0).sum(dim=1)  # [Hkv, D]
        bound = (torch.einsum("hd,hnd->hn", positive, store.summary("kmax"))
                 + torch.einsum("hd,hnd->hn", negative, store.summary("kmin")))
        return top_blocks(bound, self.topk)
