"""Block storage for one layer: its block count and per-block summaries, with the blocks' keys
and values kept in the sequence's shared `Tiers` (RAM, device, disk) under the key (layer, id).

Contract:
- `append(keys, values, summaries)` adds block number `num_blocks` (blocks are never modified);
- `gather(ids)` returns the keys and values of the blocks in `ids`, per KV head, in id order;
- `pages(ids)` returns whole blocks [n, 2, Hkv, block, D] (keys, values) on the compute device;
  `each_page(ids, take)` hands them over one by one without gathering (see `Tiers.fetch_each`);
  `read_in_place(ids, use)` lets `use` read them where the page pool holds them (no copy);
- `summary(name)` returns one summary for every block, head-major [Hkv, num_blocks, ...] (a view,
  no copy): selection scores each KV head's blocks as one matrix every step, so the layout it
  reads is the layout kept (saved memories keep block-major arrays; `restore` takes head-major);
  summaries stay on the compute device (they are small);
- `num_blocks` and `nbytes()` are plain integers; `check()` raises if the store is inconsistent.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from blockmem.memory.tiers import T, Tiers


class BlockStore:
    def __init__(self, layer: int, tiers: Tiers, kv_heads: int, block_size: int, head_dim: int) -> None:
        self.layer, self.tiers = layer, tiers
        self.kv_heads, self.block_size, self.head_dim = kv_heads, block_size, head_dim
        self.num_blocks = 0
        self.summaries: dict[str, torch.Tensor] = {}  # name -> [Hkv, capacity, ...], grown by an eighth

    def _grow_summary(self, summary: torch.Tensor, capacity: int) -> torch.Tensor:
        grown = summary.new_empty((summary.shape[0], capacity, *summary.shape[2:]))
        grown[:, : self.num_blocks] = summary[:, : self.num_blocks]
        return grown

    def append(self, keys: torch.Tensor, values: torch.Tensor, summaries: dict[str, torch.Tensor]) -> int:
        """keys, values: [Hkv, block, D]; summaries: name -> [Hkv, ...], a fixed shape per block."""
        index = self.num_blocks
        for name, value in summaries.items():
            if value.dim() == 0 or value.shape[0] != self.kv_heads:
                raise ValueError(f"summary {name} of shape {tuple(value.shape)} must lead with the "
                                 f"{self.kv_heads} KV heads")
        self.tiers.append(self.layer, index, keys, values)
        for name, value in summaries.items():
            held = self.summaries.get(name)
            if held is None:
                held = self.summaries[name] = value.new_empty((value.shape[0], 16, *value.shape[1:]))
            elif held.shape[1] == index:
                # grow by an eighth, not by doubling: a 256K-token memory's summaries are ~47 MiB,
                # and doubling held up to 3x that while copying (copies stay cheap: ~8x in all)
                held = self.summaries[name] = self._grow_summary(held, index + max(16, index // 8))
            held[:, index] = value
        self.num_blocks += 1
        return index

    def restore(self, num_blocks: int, summaries: dict[str, torch.Tensor]) -> None:
        """Adopt `num_blocks` blocks already in the tiers (a saved memory's) and their summaries,
        head-major [Hkv, num_blocks, ...] (any strides: they are copied into the layout kept)."""
        self.num_blocks = num_blocks
        self.summaries = {name: s.clone(memory_format=torch.contiguous_format) for name, s in summaries.items()}

    def pages(self, ids: list[int]) -> torch.Tensor:
        return self.tiers.fetch(self.layer, ids)

    def each_page(self, ids: list[int], take: Callable[[int, torch.Tensor], None]) -> None:
        self.tiers.fetch_each(self.layer, ids, take)

    def read_in_place(self, ids: list[int], use: Callable[[torch.Tensor, list[int]], T]) -> T:
        """See `Tiers.read_in_place`."""
        return self.tiers.read_in_place(self.layer, ids, use)

    def gather(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """ids: [Hkv, k] int64 block ids (sorted per head) -> keys, values: [1, Hkv, k * block, D]."""
        shape = (1, self.kv_heads, ids.shape[1] * self.block_size, self.head_dim)
        if bool((ids == ids[:1]).all()):  # one selection shared by all heads
            pages = self.pages(ids[0].tolist())  # [k, 2, Hkv, block, D]
            both = pages.permute(1, 2, 0, 3, 4)  # [2, Hkv, k, block, D]
            return both[0].reshape(shape), both[1].reshape(shape)
        unique, inverse = torch.unique(ids, return_inverse=True)
        pages = self.pages(unique.tolist())
        heads = torch.arange(self.kv_heads, device=pages.device)[:, None]
        inverse = inverse.to(pages.device)
        return pages[inverse, 0, heads].reshape(shape), pages[inverse, 1, heads].reshape(shape)

    def block_keys(self, index: int) -> torch.Tensor:
        """One block's keys as stored: [Hkv, block, D]."""
        return self.pages([index])[0, 0]

    def summary(self, name: str) -> torch.Tensor:
        return self.summaries[name][:, : self.num_blocks]

    def nbytes(self) -> int:
        """Bytes of this layer's blocks and summaries, wherever the blocks live."""
        summaries = sum(s[:, : self.num_blocks].numel() * s.element_size() for s in self.summaries.values())
        return self.num_blocks * self.tiers.page_bytes + summaries

    def check(self) -> None:
        for name, s in self.summaries.items():
            if s.shape[0] != self.kv_heads or s.shape[1] < self.num_blocks:
                raise AssertionError(f"summary {name} of shape {tuple(s.shape)} does not hold {self.kv_heads} "
                                     f"heads x {self.num_blocks} blocks")
        for index in range(self.num_blocks):
            if not self.tiers.holds((self.layer, index)):
                raise AssertionError(f"layer {self.layer} block {index} is in no tier")
