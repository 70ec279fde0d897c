"""`infllm` (InfLLM): sinks + window + the top-k blocks by representative keys, memory read at a
fixed distance so a model reads far past its trained window without training."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from blockmem.attention.base import LayerSpec
from blockmem.attention.blocksparse import check_pooled_rows, pool_keys, pooled_scores
from blockmem.attention.sparse import (Held, Position, SparseMethod, grouped_queries, top_blocks,
                                       top_blocks_besides)
from blockmem.errors import ConfigError
from blockmem.memory.store import BlockStore

POOL_KERNEL = 32  # tokens per pooled sub-block (InfLLM-V2's kernel; stride half of it)


@dataclass(frozen=True)
class InfLLMMethod(SparseMethod):
    """A block's representatives are its `repr_keys` tokens that received the most attention
    while in the window. InfLLM scores a block by the sum of the chunk's query dot products with
    them, which is linear, so the store keeps their mean. One selection serves all heads of a
    layer (`per_head`: one per KV head). With `position=infllm` (default) every selected token
    sits n_local positions before the query; the sinks and window keep their local positions.
    By default (`switch_length=None`) a prompt the budget covers is read exactly as `dense` (see
    `SparseMethod.for_context`); `switch_length=0` is InfLLM as published.

    `pooled_fraction` of the top-k (default half) are chosen instead by InfLLM-V2's score
    (`blocksparse`'s: each query's softmax over the means of 32 keys every 16, max over a block's
    sub-blocks, summed over the queries and, unless per head, the heads), the rest by
    representatives among the other blocks: representatives find a needle in repeated filler,
    pooled keys one in prose (docs/methods.md). `pooled_rows` (default 16): only a piece's last
    queries score pooled keys, so a question ending the prompt chooses for its piece (None: every
    query; representatives, a cheap linear score, always sum the whole piece). `pooled_hold`
    (default on): decode steps keep the pooled blocks the prompt's last piece chose instead of
    scoring every pooled key again per token, which costs memory traffic in proportion to the
    context; the representative half is still chosen per step. Both shape the pooled half only.
    `pooled_fraction=0, switch_length=0` is InfLLM as published."""

    name: ClassVar[str] = "infllm"
    needs_scores: ClassVar[bool] = True
    # what memories saved before these options existed were built with (InfLLM's representatives alone)
    saved_before: ClassVar[dict[str, Any]] = {"pooled_fraction": 0.0, "pooled_rows": None, "pooled_hold": False}
    position: Position | str = Position.INFLLM
    repr_keys: int = 4
    per_head: bool = False
    switch_length: int | None = None
    pooled_fraction: float = 0.5
    pooled_rows: int | None = 16
    pooled_hold: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 1 <= self.repr_keys <= self.block_size:
            raise ConfigError(f"infllm: repr-keys must be between 1 and the block size ({self.block_size}), got {self.repr_keys}",
                              "leave it out for the default (4)")
        if not 0.0 <= self.pooled_fraction <= 1.0:
            raise ConfigError(f"infllm: pooled-fraction must be in [0, 1], got {self.pooled_fraction}",
                              "0 selects by representative keys only (InfLLM), 1 by pooled keys only")
        check_pooled_rows(self.name, self.pooled_rows)

    def idle_options(self) -> tuple[tuple[str, ...], str, str]:
        if self.pooled_fraction == 0:
            return (("pooled_rows", "pooled_hold"), "the blocks chosen by pooled keys, and --pooled-fraction 0 leaves none",
                    "give --pooled-fraction above 0")
        return (), "", ""

    def summarize(self, keys: torch.Tensor, values: torch.Tensor, scores: torch.Tensor) -> dict[str, torch.Tensor]:
        best = torch.argsort(-scores, dim=-1, stable=True)[:, : self.repr_keys]  # [Hkv, r]
        chosen = keys.gather(1, best[..., None].expand(-1, -1, keys.shape[-1]))  # [Hkv, r, D]
        summaries = {"repr": chosen.float().mean(dim=1)}
        if self.pooled_fraction:
            kernel = min(POOL_KERNEL, self.block_size)
            summaries["pooled"] = pool_keys(keys, kernel, max(1, kernel // 2))
        return summaries

    def select(self, q: torch.Tensor, store: BlockStore, spec: LayerSpec, length: int,
               held: Held | None = None) -> torch.Tensor:
        reps = store.summary("repr")  # [Hkv, blocks, D]
        rows = grouped_queries(q, spec.num_kv_heads).float()  # [Hkv, G*T, D]
        query = rows.sum(dim=1, keepdim=True)  # [Hkv, 1, D]
        # the query on the left: bmm with a one-column right operand is ~5x slower on the CPU
        scores = torch.bmm(query, reps.transpose(1, 2))[:, 0]  # [Hkv, blocks]
        if not self.per_head:  # one score per block, summed over heads
            scores = scores.sum(dim=0, keepdim=True)
        pooled_k = round(self.topk * self.pooled_fraction)
        if pooled_k:
            first = self._pooled_pick(q, store, spec, pooled_k, held)
            chosen = top_blocks_besides(first, scores, self.topk - pooled_k)
        else:
            chosen = top_blocks(scores, self.topk)
        return chosen.expand(spec.num_kv_heads, -1)

    def _pooled_pick(self, q: torch.Tensor, store: BlockStore, spec: LayerSpec, k: int,
                     held: Held | None) -> torch.Tensor:
        """The k blocks by pooled keys, [Hkv or 1, k]. With `pooled_hold` a decode step (one
        query) reuses the pick of the piece before it; a prefill piece scores and holds its own."""
        keep = self.pooled_hold and held is not None
        if keep and q.shape[2] == 1 and held.blocks is not None:
            return held.blocks
        pooled = pooled_scores(q, store.summary("pooled"), self.pooled_rows, spec.scale)  # [Hkv, blocks]
        first = top_blocks(pooled if self.per_head else pooled.sum(dim=0, keepdim=True), k)
        if keep:
            held.blocks = first
        return first
