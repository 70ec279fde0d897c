"""`infllm` (InfLLM): sinks + window + the top-k blocks by representative keys, memory read at a
fixed distance so a model reads far past its trained window without training."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from blockmem.attention.base import LayerSpec
from blockmem.attention.sparse import Position, SparseMethod, grouped_queries, top_blocks
from blockmem.errors import ConfigError
from blockmem.memory.store import BlockStore


@dataclass(frozen=True)
class InfLLMMethod(SparseMethod):
    """A block's representatives are its `repr_keys` tokens that received the most attention
    while in the window. InfLLM scores a block by the sum of the chunk's query dot products with
    them, which is linear, so the store keeps their mean. One selection serves all heads of a
    layer (`per_head`: one per KV head). With `position=infllm` (default) every selected token
    sits n_local positions before the query; the sinks and window keep their local positions.
    By default (`switch_length=None`) a prompt the budget covers is read exactly as `dense` (see
    `SparseMethod.for_context`); `switch_length=0` is InfLLM as published."""

    name: ClassVar[str] = "infllm"
    needs_scores: ClassVar[bool] = True
    position: Position | str = Position.INFLLM
    repr_keys: int = 4
    per_head: bool = False
    switch_length: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 1 <= self.repr_keys <= self.block_size:
            raise ConfigError(f"infllm: repr-keys must be between 1 and the block size, got {self.repr_keys}")

    def summarize(self, keys: torch.Tensor, values: torch.Tensor, scores: torch.Tensor) -> dict[str, torch.Tensor]:
        best = torch.argsort(-scores, dim=-1, stable=True)[:, : self.repr_keys]  # [Hkv, r]
        chosen = keys.gather(1, best[..., None].expand(-1, -1, keys.shape[-1]))  # [Hkv, r, D]
        return {"repr": chosen.float().mean(dim=1)}

    def select(self, q: torch.Tensor, store: BlockStore, spec: LayerSpec, length: int) -> torch.Tensor:
        reps = store.summary("repr")  # [blocks, Hkv, D]
        query = grouped_queries(q, spec.num_kv_heads).float().sum(dim=1)  # [Hkv, D]
        if self.per_head:
            return top_blocks(torch.einsum("hd,nhd->hn", query, reps), self.topk)
        # One score per block, summed over heads: a single matrix-vector product.
        scores = reps.reshape(reps.shape[0], -1) @ query.reshape(-1)
        return top_blocks(scores[None], self.topk).expand(spec.num_kv_heads, -1)
