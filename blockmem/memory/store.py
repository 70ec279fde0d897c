"""Block storage: full blocks of one layer's keys and values, with per-block summaries.

Contract (what a tiered or on-disk store must also honour):
- `append(keys, values, summaries)` adds block number `num_blocks` (blocks are never modified);
- `gather(ids)` returns the keys and values of the blocks in `ids`, per KV head, in id order;
- `summary(name)` returns one summary for every block, [num_blocks, ...];
- `num_blocks` and `nbytes()` are plain integers; `check()` raises if the store is inconsistent.
This RAM store keeps blocks in preallocated pools that grow by doubling.
"""

from __future__ import annotations

import torch


class BlockStore:
    def __init__(self, kv_heads: int, block_size: int, head_dim: int, device: torch.device, dtype: torch.dtype) -> None:
        self.kv_heads, self.block_size, self.head_dim = kv_heads, block_size, head_dim
        self.num_blocks = 0
        # Head-major pools [Hkv, capacity, block, D]: a gather is one index_select per head group
        # and its result is already the [Hkv, k * block, D] layout attention reads.
        shape = (kv_heads, 0, block_size, head_dim)
        self.keys = torch.empty(shape, device=device, dtype=dtype)
        self.values = torch.empty(shape, device=device, dtype=dtype)
        self.summaries: dict[str, torch.Tensor] = {}  # name -> [capacity, ...]

    @property
    def capacity(self) -> int:
        return self.keys.shape[1]

    def _grow_pool(self, pool: torch.Tensor, capacity: int) -> torch.Tensor:
        grown = pool.new_empty((pool.shape[0], capacity, *pool.shape[2:]))
        grown[:, : self.num_blocks] = pool[:, : self.num_blocks]
        return grown

    def _grow_summary(self, summary: torch.Tensor, capacity: int) -> torch.Tensor:
        grown = summary.new_empty((capacity, *summary.shape[1:]))
        grown[: self.num_blocks] = summary[: self.num_blocks]
        return grown

    def append(self, keys: torch.Tensor, values: torch.Tensor, summaries: dict[str, torch.Tensor]) -> int:
        """keys, values: [Hkv, block, D]; summaries: name -> tensor of a fixed shape per block."""
        if self.num_blocks == self.capacity:
            capacity = max(16, 2 * self.num_blocks)
            self.keys, self.values = self._grow_pool(self.keys, capacity), self._grow_pool(self.values, capacity)
            self.summaries = {name: self._grow_summary(s, capacity) for name, s in self.summaries.items()}
        index = self.num_blocks
        self.keys[:, index], self.values[:, index] = keys, values
        for name, value in summaries.items():
            if name not in self.summaries:
                self.summaries[name] = value.new_empty((self.capacity, *value.shape))
            self.summaries[name][index] = value
        self.num_blocks += 1
        return index

    def gather(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """ids: [Hkv, k] int64 block ids (sorted per head) -> keys, values: [1, Hkv, k * block, D]."""
        shape = (1, self.kv_heads, ids.shape[1] * self.block_size, self.head_dim)
        if bool((ids == ids[:1]).all()):  # one selection shared by all heads
            return (self.keys.index_select(1, ids[0]).reshape(shape),
                    self.values.index_select(1, ids[0]).reshape(shape))
        heads = torch.arange(self.kv_heads, device=ids.device)[:, None]
        return self.keys[heads, ids].reshape(shape), self.values[heads, ids].reshape(shape)

    def block_keys(self, index: int) -> torch.Tensor:
        """One block's keys as stored: [Hkv, block, D]."""
        return self.keys[:, index]

    def summary(self, name: str) -> torch.Tensor:
        return self.summaries[name][: self.num_blocks]

    def nbytes(self) -> int:
        used = self.keys[:, : self.num_blocks]
        summaries = sum(s[: self.num_blocks].numel() * s.element_size() for s in self.summaries.values())
        return 2 * used.numel() * used.element_size() + summaries

    def check(self) -> None:
        if not 0 <= self.num_blocks <= self.capacity:
            raise AssertionError(f"block count {self.num_blocks} outside capacity {self.capacity}")
        if self.values.shape != self.keys.shape:
            raise AssertionError("key and value pools differ in shape")
        for name, s in self.summaries.items():
            if s.shape[0] != self.capacity:
                raise AssertionError(f"summary {name} has capacity {s.shape[0]}, pools {self.capacity}")
