"""`blocksparse` (InfLLM-V2 style): dense below a switch length; beyond it sinks + window + the
top-k blocks by mean-pooled block keys, one selection per GQA group, true positions."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from blockmem.attention.base import LayerSpec
from blockmem.attention.sparse import Held, SparseMethod, grouped_queries, top_blocks
from blockmem.errors import ConfigError
from blockmem.memory.store import BlockStore

_ROWS = 256  # query rows scored at a time, so scoring memory stays bounded for long chunks


@dataclass(frozen=True)
class BlockSparseMethod(SparseMethod):
    """Each block is pooled into sub-blocks (`pool_kernel` tokens every `pool_stride`); each
    query's attention probability over all sub-blocks is max-pooled to its block and summed over
    the query heads of a KV group and the piece's queries (its last `pooled_rows` when set).
    While the sequence is shorter than `switch_length` every block is read (dense). Scaled from
    InfLLM-V2's block 64 / kernel 32 / stride 16 / switch 8192 for small models."""

    name: ClassVar[str] = "blocksparse"
    n_init: int = 64
    block_size: int = 64
    topk: int = 32
    switch_length: int = 4096
    pool_kernel: int | None = None  # default: half a block (InfLLM-V2: 32 of 64)
    pool_stride: int | None = None  # default: half the kernel (InfLLM-V2: 16)
    pooled_rows: int | None = None  # a piece's last this many queries score pooled keys (default: all)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.pool_kernel is None:
            object.__setattr__(self, "pool_kernel", max(1, self.block_size // 2))
        if self.pool_stride is None:
            object.__setattr__(self, "pool_stride", max(1, self.pool_kernel // 2))
        if not (1 <= self.pool_kernel <= self.block_size and self.pool_stride >= 1):
            raise ConfigError(f"{self.name}: pool-kernel must be 1..block-size ({self.block_size}) and pool-stride at least 1, "
                              f"got {self.pool_kernel} and {self.pool_stride}", "leave both out for the defaults")
        check_pooled_rows(self.name, self.pooled_rows)

    def summarize(self, keys: torch.Tensor, values: torch.Tensor, scores: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"pooled": pool_keys(keys, self.pool_kernel, self.pool_stride)}

    def block_scores(self, q: torch.Tensor, store: BlockStore, spec: LayerSpec) -> torch.Tensor:
        """[Hkv, blocks]: summed per-query probability of each block's best sub-block."""
        return pooled_scores(q, store.summary("pooled"), self.pooled_rows, spec.scale)

    def select(self, q: torch.Tensor, store: BlockStore, spec: LayerSpec, length: int,
               held: Held | None = None) -> torch.Tensor:
        return top_blocks(self.block_scores(q, store, spec), self.topk)


def check_pooled_rows(method: str, rows: int | None) -> None:
    if rows is not None and rows < 1:
        raise ConfigError(f"{method}: pooled-rows must be at least 1, got {rows}",
                          "leave it out to score pooled keys with every query of a piece")


def pooled_scores(q: torch.Tensor, pooled: torch.Tensor, rows: int | None, scale: float) -> torch.Tensor:
    """q [1, Hq, T, D], pooled [Hkv, blocks, sub, D] -> [Hkv, blocks], scored by the piece's last
    `rows` queries (all of them for None). Scoring costs in proportion to the rows; a question at
    the end of a piece then chooses for all of it."""
    last = q if rows is None else q[:, :, -rows:]
    return pooled_block_scores(grouped_queries(last, pooled.shape[0]).float(), pooled, scale)


def pool_keys(keys: torch.Tensor, kernel: int, stride: int) -> torch.Tensor:
    """keys [Hkv, block, D] -> [Hkv, sub, D]: the mean of every `kernel` tokens, every `stride`."""
    return keys.float().unfold(1, kernel, stride).mean(dim=-1)


def pooled_block_scores(rows: torch.Tensor, pooled: torch.Tensor, scale: float) -> torch.Tensor:
    """rows [Hkv, R, D], pooled [Hkv, blocks, sub, D] -> [Hkv, blocks]: per row, softmax over every
    sub-block, max-pooled to its block, summed over the rows (in chunks of _ROWS)."""
    heads, blocks, sub, dim = pooled.shape
    keys = pooled.reshape(heads, blocks * sub, dim)  # a view of the store's head-major summaries
    total = torch.zeros(heads, blocks, device=rows.device)
    for first in range(0, rows.shape[1], _ROWS):
        logits = torch.bmm(rows[:, first:first + _ROWS], keys.transpose(1, 2)) * scale
        probs = torch.softmax(logits, dim=-1).reshape(heads, -1, blocks, sub)
        total += probs.amax(dim=-1).sum(dim=1)
    return total
