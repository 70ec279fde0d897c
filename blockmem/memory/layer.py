"""One layer's context memory: sinks, blocks of older tokens, and a window of recent ones.

    positions: [0, n_init) sinks | [n_init, window_start) blocks (or dropped) | [window_start, length) window

Tokens enter the window; once it holds n_local + block_size tokens, its oldest full block leaves
for the block store (or is dropped by methods that keep no blocks). Until the first token
leaves, the context is contiguous and methods attend it exactly like `dense`.
Keys are kept rotated at their true positions in the sinks and window; `attention/sparse.py`
decides how blocks are stored and at which positions each part is read. All lengths are Python
integers kept here, never inferred from tensor contents.
"""

from __future__ import annotations

import torch

from blockmem.memory.store import BlockStore


_SLACK = 128  # spare tokens a window buffer gets when it is (re)allocated


class Window:
    """Recent tokens in a buffer [1, Hkv, capacity, D]; the live span is [begin, end)."""

    def __init__(self, kv_heads: int, head_dim: int, device: torch.device, dtype: torch.dtype) -> None:
        self.keys = torch.empty(1, kv_heads, 0, head_dim, device=device, dtype=dtype)
        self.values = torch.empty_like(self.keys)
        self.scores = torch.zeros(kv_heads, 0, device=device)  # attention mass each token received
        self.begin = self.end = 0

    def __len__(self) -> int:
        return self.end - self.begin

    def _make_room(self, extra: int) -> None:
        size = len(self)
        if self.end + extra <= self.keys.shape[2]:
            return
        # Room for this append and 128 tokens more: compacting copies the live span (~2K tokens
        # every 128 decode steps, or once per prefill piece), cheap next to attention; more slack
        # is RAM held in every layer (a quarter of the window was ~18 MiB over 30 float32 layers).
        capacity = max(256, size + extra + _SLACK)
        keys = self.keys.new_empty(*self.keys.shape[:2], capacity, self.keys.shape[3])
        values = self.values.new_empty(keys.shape)
        scores = self.scores.new_zeros(self.scores.shape[0], capacity)
        keys[:, :, :size] = self.keys[:, :, self.begin:self.end]
        values[:, :, :size] = self.values[:, :, self.begin:self.end]
        scores[:, :size] = self.scores[:, self.begin:self.end]
        self.keys, self.values, self.scores = keys, values, scores
        self.begin, self.end = 0, size

    def adopt(self, keys: torch.Tensor, values: torch.Tensor, scores: torch.Tensor) -> None:
        """Take these tensors (a restored window, [1, Hkv, T, D] and [Hkv, T]) as the buffer,
        without copying; an empty window only."""
        if len(self) or self.keys.shape[2]:
            raise AssertionError("adopt() restores an empty window")
        self.keys, self.values, self.scores = keys.contiguous(), values.contiguous(), scores.contiguous()
        self.begin, self.end = 0, keys.shape[2]

    def append(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """keys, values: [1, Hkv, T, D]."""
        length = keys.shape[2]
        self._make_room(length)
        self.keys[:, :, self.end:self.end + length] = keys
        self.values[:, :, self.end:self.end + length] = values
        self.scores[:, self.end:self.end + length] = 0.0
        self.end += length

    def span(self, first: int = 0, last: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of window tokens first..last-1 (indices within the window)."""
        last = len(self) if last is None else last
        return (self.keys[:, :, self.begin + first:self.begin + last],
                self.values[:, :, self.begin + first:self.begin + last])

    def add_scores(self, scores: torch.Tensor) -> None:
        """scores: [Hkv, n] attention mass received by the window's first n tokens."""
        self.scores[:, self.begin:self.begin + scores.shape[1]] += scores

    def pop_front(self, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Remove the oldest n tokens: keys, values [Hkv, n, D] and scores [Hkv, n] (copies)."""
        out = (self.keys[0, :, self.begin:self.begin + n].clone(), self.values[0, :, self.begin:self.begin + n].clone(),
               self.scores[:, self.begin:self.begin + n].clone())
        self.begin += n
        return out


class LayerMemory:
    def __init__(self, kv_heads: int, head_dim: int, n_init: int, n_local: int, block_size: int,
                 store: BlockStore | None, device: torch.device, dtype: torch.dtype) -> None:
        self.n_init, self.n_local, self.block_size = n_init, n_local, block_size
        self.init_keys = torch.empty(1, kv_heads, 0, head_dim, device=device, dtype=dtype)
        self.init_values = torch.empty_like(self.init_keys)
        self.window = Window(kv_heads, head_dim, device, dtype)
        self.store = store  # None: evicted tokens are dropped
        self.length = 0  # tokens written
        self.evicted = 0  # tokens that left the window (into blocks, or dropped)

    @property
    def contiguous(self) -> bool:
        """True while every token written is still in the sinks or the window."""
        return self.evicted == 0

    @property
    def init_length(self) -> int:
        return self.init_keys.shape[2]

    @property
    def window_start(self) -> int:
        """Absolute position of the window's first token."""
        return self.init_length + self.evicted

    def append(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """keys (rotated at true positions), values: [1, Hkv, T, D] for positions length..length+T-1."""
        into_init = max(0, min(self.n_init - self.length, keys.shape[2]))
        if into_init:
            self.init_keys = torch.cat([self.init_keys, keys[:, :, :into_init]], dim=2)
            self.init_values = torch.cat([self.init_values, values[:, :, :into_init]], dim=2)
        if into_init < keys.shape[2]:
            self.window.append(keys[:, :, into_init:], values[:, :, into_init:])
        self.length += keys.shape[2]

    def local(self) -> tuple[torch.Tensor, torch.Tensor]:
        """While contiguous: all keys and values so far, [1, Hkv, length, D]."""
        keys, values = self.window.span()
        return torch.cat([self.init_keys, keys], dim=2), torch.cat([self.init_values, values], dim=2)

    def evictable(self) -> int:
        """Tokens that should leave the window now: whole blocks beyond n_local."""
        surplus = len(self.window) - self.n_local
        return surplus // self.block_size * self.block_size if surplus >= self.block_size else 0

    def pop_block(self) -> tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The window's oldest block: (first position, keys, values [Hkv, block, D], scores [Hkv, block])."""
        first = self.window_start
        keys, values, scores = self.window.pop_front(self.block_size)
        self.evicted += self.block_size
        return first, keys, values, scores

    def nbytes(self) -> int:
        window = len(self.window) * self.window.keys.shape[1] * self.window.keys.shape[3] * 2
        init = self.init_keys.numel() * 2
        return (window + init) * self.init_keys.element_size() + (self.store.nbytes() if self.store else 0)
