"""What every block-memory method shares: the attend step over sinks, selected blocks and window.

Queries go in execution pieces of at most `exec_size`; each piece attends up to three parts,
each with the query rotated for that part, merged exactly by log-sum-exp:
    sinks + top-k blocks   one part: every position policy reads both with the same query
                           rotation (true positions; infllm: memory at a fixed distance n_local,
                           sink j at n_local - j; compacted: renumbered after the sinks)
    window before piece    true positions, no mask (relative distances are exact)
    the piece itself       true positions, causal (the window's tail)
Until the first token leaves the window everything is read like `dense`, and so is every block,
at its true position, while the sequence is shorter than the method's `switch_length` (InfLLM-V2's
dense-sparse switch; `None` decides it per prompt, see `for_context`). After attending, the
window's oldest whole blocks beyond n_local move to the block store with the method's summary.
A method subclasses `SparseMethod` and implements `summarize` and `select`.
"""

from __future__ import annotations

import enum
from abc import abstractmethod
from dataclasses import dataclass, fields, replace
from typing import Any, ClassVar

import torch

from blockmem.attention import kernels
from blockmem.attention.base import AttentionMethod, KVCache, LayerCache, LayerSpec
from blockmem.attention.dense import DenseLayer
from blockmem.attention.merge import attend_parts, merge, partial_attention
from blockmem.attention.telemetry import Telemetry
from blockmem.errors import ConfigError
from blockmem.memory.layer import LayerMemory
from blockmem.memory.store import BlockStore
from blockmem.memory.tiers import BaseBlocks, TierConfig, Tiers
from blockmem.model.rope import Rotary


_SCORING_QUERIES = 256  # most queries of a chunk used to score window tokens


class Position(enum.Enum):
    TRUE = "true"  # every key at its absolute position (long-trained or natively sparse models)
    INFLLM = "infllm"  # sinks and selected memory at a fixed distance n_local, window at true distances
    COMPACTED = "compacted"  # sinks, selected blocks and window renumbered contiguously


@dataclass
class Held:
    """Blocks a layer's selection keeps from one step to the next: a pick made by a prefill piece
    that the decode steps after it reuse instead of scoring again (`infllm --pooled-hold`). The
    layer empties it when it settles, so a reopened memory selects as the in-process one does."""

    blocks: torch.Tensor | None = None  # [Hkv or 1, k]


@dataclass(frozen=True)
class SparseMethod(AttentionMethod):
    """Common options. Subclasses add theirs and say in their docstring what they read."""

    n_init: int = 128
    n_local: int = 2048
    block_size: int = 128
    topk: int = 16
    position: Position | str = Position.TRUE
    exec_size: int = 512  # queries that share one selection (InfLLM's execution block)
    last_alone: bool = False  # a chunk's last query selects on its own, as a decode step does
    switch_length: int | None = 0  # every block read at its true position below this many tokens
    keeps_blocks: ClassVar[bool] = True  # False: evicted tokens are dropped (StreamingLLM)
    needs_scores: ClassVar[bool] = False  # True: track the attention mass window tokens receive

    def __post_init__(self) -> None:
        try:
            object.__setattr__(self, "position", Position(self.position))
        except ValueError:
            raise ConfigError(f"unknown position policy {self.position!r}", "use true, infllm or compacted") from None
        for name in ("n_local", "block_size", "exec_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{self.name}: {name.replace('_', '-')} must be at least 1, got {getattr(self, name)}",
                                  "leave it out for the method's default (docs/methods.md lists them)")
        for name in ("n_init", "topk"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{self.name}: {name.replace('_', '-')} must not be negative, got {getattr(self, name)}",
                                  "use 0 for none, or leave it out for the method's default")
        if self.switch_length is not None and self.switch_length < 0:
            raise ConfigError(f"{self.name}: switch-length must not be negative, got {self.switch_length}",
                              "use 0 to select blocks from the first evicted one, or leave it out for the default")
        if self.switch_length and not self.keeps_blocks:
            raise ConfigError(f"{self.name}: switch-length needs a method that keeps old blocks; {self.name} drops them",
                              "leave --switch-length out")

    def context_limit(self, model_limit: int) -> int | None:
        return None  # bounded by memory, not by the model's window

    def for_context(self, tokens: int | None) -> SparseMethod:
        """`switch_length=None`: a prompt the budget covers is read exactly as dense while the
        sequence fits the budget (a query would read every block anyway); a longer one is read by
        the position policy from its first evicted block. Deciding once per prompt, not per step,
        keeps a long prompt in one regime: switching to the fixed distance part-way through lost
        passkeys whose needle lay in the dense-read part (docs/passkey.md). A sequence of unknown
        length (a saved memory, which can be extended) gets 0."""
        if self.switch_length is not None:
            return self
        covered = tokens is not None and tokens <= self.budget()
        return replace(self, switch_length=self.budget() + 1 if covered else 0)

    def budget(self) -> int:
        """The effective budget: sinks + window + k blocks, in tokens."""
        return self.n_init + self.n_local + (self.topk * self.block_size if self.keeps_blocks else 0)

    def max_attended(self) -> int:
        """The most tokens one query reads: the window runs up to a block past n_local before its
        oldest block leaves."""
        return self.budget() + self.block_size - 1

    def describe(self) -> dict[str, Any]:
        options = {f.name: getattr(self, f.name) for f in fields(self)}
        options["position"] = self.position.value
        return {"method": self.name, **options, "effective_budget": self.budget(), "max_attended": self.max_attended()}

    def new_cache(self, specs: list[LayerSpec], device: torch.device, dtype: torch.dtype,
                  tiers: TierConfig | None = None, base: BaseBlocks | None = None) -> KVCache:
        if self.switch_length is None:  # not sized for a prompt (a bare cache)
            return self.for_context(None).new_cache(specs, device, dtype, tiers, base)
        telemetry = Telemetry(len(specs))
        shared = None
        if self.keeps_blocks:
            spec = next((s for s in specs if s.window is None), specs[0])
            shared = Tiers((2, spec.num_kv_heads, self.block_size, spec.head_dim), device, dtype, tiers, base,
                           step_blocks=max(1, self.topk * spec.num_kv_heads))  # per-head selections may differ
        layers: list[LayerCache] = [
            DenseLayer(spec, device, dtype) if spec.window is not None  # sliding layers keep their own window
            else SparseLayer(self, spec, telemetry, shared, device, dtype) for spec in specs]
        return KVCache(layers, telemetry, shared)

    @abstractmethod
    def summarize(self, keys: torch.Tensor, values: torch.Tensor, scores: torch.Tensor) -> dict[str, torch.Tensor]:
        """Summaries of one block leaving the window. keys (as stored), values: [Hkv, block, D];
        scores: [Hkv, block] attention mass each token received while in the window."""

    def read_ahead(self, store: BlockStore, spec: LayerSpec) -> list[int]:
        """Blocks this method will read whatever the query: the tiers read them from disk ahead of
        use when a saved memory is opened. None by default."""
        return []

    @abstractmethod
    def select(self, q: torch.Tensor, store: BlockStore, spec: LayerSpec, length: int,
               held: Held | None = None) -> torch.Tensor:
        """Block ids to read: [Hkv, k], sorted per head. q: [1, Hq, T, D], rotated as the memory
        part will see it; `length`: tokens in the sequence so far; `held`: the layer's picks kept
        between steps (None: keep nothing). Only called when the store holds more than `topk`
        blocks, at or past the switch length."""



def top_blocks(scores: torch.Tensor, k: int) -> torch.Tensor:
    """scores: [Hkv, n] -> the k best ids per head, sorted by position [Hkv, k]. Ties go to the
    lower id (deterministic)."""
    order = torch.argsort(-scores, dim=-1, stable=True)[:, :k]
    return order.sort(dim=-1).values


def top_blocks_besides(chosen: torch.Tensor, scores: torch.Tensor, k: int) -> torch.Tensor:
    """The blocks already `chosen` [H, a] and the k best of the others by `scores` [H, n], sorted
    by position [H, a + k]: a selection made of two scores' picks."""
    others = scores.scatter(1, chosen, float("-inf"))
    return torch.cat([chosen, top_blocks(others, k)], dim=1).sort(dim=1).values


def grouped_queries(q: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """q: [1, Hq, T, D] -> [Hkv, G * T, D]: the query heads sharing a KV head as one block of rows."""
    return q.reshape(kv_heads, -1, q.shape[-1])


class WorkingSet:
    """Selected blocks held in slots after a fixed prefix (the sinks): keys, values
    [1, Hkv, prefix + k * block, D]; slots [Hkv, k] the block id in each slot. A new selection
    overwrites only the slots of blocks no longer selected."""

    def __init__(self, slots: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, prefix: int = 0) -> None:
        self.slots, self.keys, self.values, self.prefix = slots, keys, values, prefix

    def update(self, store: BlockStore, ids: torch.Tensor) -> None:
        slots = self.slots.tolist()
        wanted_ids = ids.tolist()
        if all(row == slots[0] for row in slots) and all(row == wanted_ids[0] for row in wanted_ids):
            self._update_shared(store, slots[0], wanted_ids[0])  # one selection for every head
            return
        changes = []  # (head, slot, block) for each block a head newly wants
        for head, (old, new) in enumerate(zip(slots, wanted_ids)):
            if old == new:
                continue
            wanted, held = set(new), set(old)
            free = [slot for slot, block in enumerate(old) if block not in wanted]
            changes += zip([head] * len(free), free, [block for block in new if block not in held])
        if not changes:
            return
        targets: dict[int, list[tuple[int, int]]] = {}  # block -> (head, slot) it goes to
        for head, slot, block in changes:
            targets.setdefault(block, []).append((head, slot))
            self.slots[head, slot] = block
        needed = sorted(targets)  # each block fetched once, whichever heads want it
        keys, values = self._slot_views(store)

        def take(i: int, page: torch.Tensor) -> None:
            for head, slot in targets[needed[i]]:
                keys[head, slot].copy_(page[0, head])
                values[head, slot].copy_(page[1, head])

        store.each_page(needed, take)

    def _update_shared(self, store: BlockStore, old: list[int], new: list[int]) -> None:
        """Every head held and wants the same blocks: one copy per block and part for all heads."""
        held, wanted = set(old), set(new)
        added = [block for block in new if block not in held]
        if not added:
            return
        free = [slot for slot, block in enumerate(old) if block not in wanted]
        keys, values = self._slot_views(store)

        def take(i: int, page: torch.Tensor) -> None:
            keys[:, free[i]].copy_(page[0])
            values[:, free[i]].copy_(page[1])

        store.each_page(added, take)
        self.slots[:, free] = torch.tensor(added, device=self.slots.device)

    def _slot_views(self, store: BlockStore) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values after the prefix as [Hkv, k, block, D]: [head, slot] is one block."""
        heads, k = self.slots.shape
        shape = (heads, k, store.block_size, store.head_dim)
        return self.keys[0, :, self.prefix:].view(shape), self.values[0, :, self.prefix:].view(shape)


class SparseLayer(LayerCache):
    def __init__(self, method: SparseMethod, spec: LayerSpec, telemetry: Telemetry, tiers: Tiers | None,
                 device: torch.device, dtype: torch.dtype) -> None:
        self.method, self.spec, self.telemetry = method, spec, telemetry
        store = None if tiers is None else BlockStore(spec.index, tiers, spec.num_kv_heads, method.block_size,
                                                      spec.head_dim)
        self.memory = LayerMemory(spec.num_kv_heads, spec.head_dim, method.n_init, method.n_local, method.block_size,
                                  store, device, dtype)
        self._working: WorkingSet | None = None
        self._held = Held()

    def settle(self) -> None:
        """Drop the working set (a cache of selected blocks) and any held pick; the next step
        gathers and selects afresh."""
        self._working = None
        self._held = Held()

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rotary: Rotary, start: int) -> torch.Tensor:
        if q.shape[0] != 1:
            raise ConfigError(f"the {self.method.name} method serves one sequence at a time (batch size 1)")
        count = q.shape[2]
        bounds = [*range(0, count, self.method.exec_size), count]
        if self.method.last_alone and count > 1 and bounds[-2] != count - 1:
            bounds.insert(-1, count - 1)  # the row that writes the next token is not outvoted by its piece
        prefill = count > 1  # a one-query piece of a longer chunk (last_alone) is still prefill
        if len(bounds) == 2:
            return self._attend_piece(q, k, v, rotary, start, prefill)
        # Long chunks go in pieces: each piece selects its own blocks, as queries far apart want
        # different memory (a question at the end of a chunk of filler, say).
        return torch.cat([self._attend_piece(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], rotary, start + a, prefill)
                          for a, b in zip(bounds, bounds[1:])], dim=2)

    def _attend_piece(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rotary: Rotary, start: int,
                      prefill: bool) -> torch.Tensor:
        memory, scale, length = self.memory, self.spec.scale, q.shape[2]
        q_true = rotary.rotate(q, start)
        memory.append(rotary.rotate(k, start), v)
        if memory.contiguous:
            keys, values = memory.local()
            out, lse = self._with_window([], q_true, keys, values, length, scale)
            self.telemetry.record(self.spec.index, length, start + length, None, prefill)
        else:
            out, lse = self._attend_memory(q, q_true, rotary, start, length, scale, prefill)
        if self.method.needs_scores:
            self._score_window(q_true, lse, start)
        self._evict(rotary)
        return out

    def _with_window(self, parts: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], q_true: torch.Tensor,
                     keys: torch.Tensor, values: torch.Tensor, length: int,
                     scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        """`parts` (q, k, v) and the window's keys before the piece read without a mask, the
        piece's own keys (the window's last `length`) causally; a single query reads all at once."""
        prefix = keys.shape[2] - (length if length > 1 else 0)
        free = [part for part in [*parts, (q_true, keys[:, :, :prefix], values[:, :, :prefix])] if part[1].shape[2]]
        causal = None if length == 1 else partial_attention(q_true, keys[:, :, prefix:], values[:, :, prefix:], scale,
                                                            causal=True)
        if not free:
            return causal
        read = attend_parts(free, scale)
        return read if causal is None else merge([read, causal])

    def _attend_memory(self, q: torch.Tensor, q_true: torch.Tensor, rotary: Rotary, start: int, length: int,
                       scale: float, prefill: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Sinks and selected blocks as one part (every policy reads them with the same query
        rotation), then the window before the piece and the piece itself."""
        memory = self.memory
        position = self._position(start + length)
        q_far = None if position is Position.COMPACTED else self._far_query(q, q_true, rotary, 0, position)
        if length == 1 and q_far is not None:
            read = self._attend_in_place(q_far, q_true, start + length, scale, prefill)
            if read is not None:
                return read
        far_keys, far_values, selected = self._far(q if q_far is None else q_far, rotary, start + length, length,
                                                   position)
        if q_far is None:  # compacted: the query sits after the selected blocks and the window so far
            q_far = self._far_query(q, q_true, rotary, far_keys.shape[2] - memory.init_length + start - memory.window_start,
                                    position)
        window_keys, window_values = memory.window.span()
        self.telemetry.record(self.spec.index, length, far_keys.shape[2] + window_keys.shape[2],
                              None if selected is None else selected.tolist(), prefill)
        return self._with_window([(q_far, far_keys, far_values)], q_true, window_keys, window_values, length, scale)

    def _attend_in_place(self, q_far: torch.Tensor, q_true: torch.Tensor, length: int, scale: float,
                         prefill: bool) -> tuple[torch.Tensor, torch.Tensor] | None:
        """A decode step through the native kernel, which reads the selected blocks where the page
        pool holds them: no working set, nothing copied. The sinks, each selected block and the
        window are parts of one kernel call. None (before selecting anything) where the kernel
        cannot: not built, blocks not in a pool on this CPU, stored in another dtype."""
        memory, store = self.memory, self.memory.store
        if store is None or not store.num_blocks or not store.tiers.pool_serves_compute:
            return None
        heads, dim = self.spec.num_kv_heads, self.spec.head_dim
        far_rows, true_rows = q_far.reshape(heads, -1, dim), q_true.reshape(heads, -1, dim)
        window_keys, window_values = memory.window.span()
        sinks = kernels.key_set(memory.init_keys[0], memory.init_values[0]) if memory.init_length else None
        window = kernels.key_set(window_keys[0], window_values[0])
        if (store.tiers.storage_dtype != window_keys.dtype
                or not kernels.supports(far_rows, [window] + ([sinks] if memory.init_length else []))):
            return None
        ids = self._select(q_far, store, length)
        selected = ids.tolist()
        needed = sorted({block for row in selected for block in row})

        def attend(pages: torch.Tensor, slots: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
            # pages [capacity, 2, Hkv, block, D]: head h of a block's keys starts at page + h * head
            size = pages.element_size()
            page, head, values = pages.stride(0) * size, pages.stride(2) * size, pages.stride(1) * size
            start = {block: pages.data_ptr() + slot * page for block, slot in zip(needed, slots)}
            parts = [] if sinks is None else [(far_rows, sinks)]
            for j in range(len(selected[0])):
                keys = tuple(start[selected[h][j]] + h * head for h in range(heads))
                parts.append((far_rows, kernels.KeySet(keys, tuple(a + values for a in keys), dim, dim,
                                                       store.block_size, pages.dtype)))
            parts.append((true_rows, window))
            return kernels.attention(parts, scale)

        out, lse = store.read_in_place(needed, attend)
        self._working = None  # a decode step here needs no copies: drop any left from prefill
        self.telemetry.record(self.spec.index, 1, memory.init_length + len(selected[0]) * store.block_size
                              + window_keys.shape[2], selected, prefill)
        return out.reshape(q_true.shape), lse.reshape(q_true.shape[:-1])

    def _position(self, length: int) -> Position:
        """The position policy of a step at `length` tokens. Below the switch length every block is
        read where it lies: blocks stored position-free are then read compacted, which with every
        block selected, in order, puts each token at its true position."""
        position = self.method.position
        if length < self.method.switch_length and position is not Position.TRUE:
            return Position.COMPACTED
        return position

    def _far(self, query: torch.Tensor, rotary: Rotary, length: int, piece: int,
             position: Position) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Keys and values of the sinks followed by the selected blocks, and the selection [Hkv, k].
        `query` is the query blocks are scored with (position-free under compacted); `length` the
        tokens so far, `piece` the queries of this step."""
        memory, store = self.memory, self.memory.store
        if store is None or not store.num_blocks:
            return memory.init_keys, memory.init_values, None
        ids = self._select(query, store, length)
        keys, values = self._gather(store, ids, rotary, piece == 1, position)
        return keys, values, ids

    def _far_query(self, q: torch.Tensor, q_true: torch.Tensor, rotary: Rotary, offset: int,
                   position: Position) -> torch.Tensor:
        """The query as sinks and blocks see it. true: its true position. infllm: n_local, so every
        block token (stored position-free) sits n_local before it and sink j at n_local - j, as
        InfLLM reads its sinks with its memory. compacted: `offset` (selected blocks + window so
        far) after the sinks. Selection under compacted compares position-free queries and keys."""
        if position is Position.TRUE:
            return q_true
        if position is Position.INFLLM:
            return rotary.rotate_at(q, self.method.n_local)
        return rotary.rotate(q, self.memory.init_length + offset)

    def _gather(self, store: BlockStore, ids: torch.Tensor, rotary: Rotary, keep: bool,
                position: Position) -> tuple[torch.Tensor, torch.Tensor]:
        """Sinks then the selected blocks. Compacted positions need the blocks in order, rotated
        right after the sinks; otherwise positions are baked into the stored keys and order is
        free, so for decode steps (`keep`) a working set of slots is kept and only blocks that
        changed are copied in. Prefill pieces, far apart, gather afresh and keep nothing, so a
        long prefill holds one layer's selected blocks at a time, not every layer's."""
        memory = self.memory
        if position is Position.COMPACTED or not keep:
            keys, values = store.gather(ids)
            if position is Position.COMPACTED:
                keys = rotary.rotate(keys, memory.init_length)
            return torch.cat([memory.init_keys, keys], dim=2), torch.cat([memory.init_values, values], dim=2)
        working = self._working
        if working is None or working.slots.shape != ids.shape:
            keys, values = store.gather(ids)
            self._working = working = WorkingSet(ids.clone(), torch.cat([memory.init_keys, keys], dim=2),
                                                 torch.cat([memory.init_values, values], dim=2), memory.init_length)
        else:
            working.update(store, ids)
        return working.keys, working.values

    def _select(self, q_memory: torch.Tensor, store: BlockStore, length: int) -> torch.Tensor:
        heads = self.spec.num_kv_heads
        if store.num_blocks <= self.method.topk or length < self.method.switch_length:
            return torch.arange(store.num_blocks, device=q_memory.device).expand(heads, -1)
        return self.method.select(q_memory, store, self.spec, length, self._held)

    def _score_window(self, q_true: torch.Tensor, lse: torch.Tensor, start: int) -> None:
        """Add the attention mass this chunk's queries gave the window tokens about to leave."""
        memory, heads = self.memory, self.spec.num_kv_heads
        zone = min(len(memory.window), memory.evictable() + memory.block_size)
        if zone == 0:
            return
        keys, _ = memory.window.span(0, zone)
        # Every `step`-th query of a long chunk is enough to rank tokens within their block.
        step = max(1, q_true.shape[2] // _SCORING_QUERIES)
        queries, lse = (q_true, lse) if step == 1 else (q_true[:, :, ::step], lse[:, :, ::step])
        # exp(q.k * scale - lse): each query's probability for each key, [Hkv, G*T', zone]
        probs = torch.baddbmm(lse.reshape(heads, -1, 1), grouped_queries(queries, heads).float(),
                              keys[0].float().transpose(1, 2), beta=-1.0, alpha=self.spec.scale).exp_()
        first = memory.window_start
        if first + zone - 1 > start:  # later tokens of this chunk: a query only counts keys it could see
            q_pos = torch.arange(start, start + q_true.shape[2], step, device=probs.device)
            q_pos = q_pos.repeat(probs.shape[1] // q_pos.shape[0])
            k_pos = torch.arange(first, first + zone, device=probs.device)
            probs = probs * (k_pos[None, :] <= q_pos[:, None])
        scores = probs.sum(dim=1)
        memory.window.add_scores(scores if step == 1 else scores * step)

    def _evict(self, rotary: Rotary) -> None:
        memory, store = self.memory, self.memory.store
        for _ in range(memory.evictable() // memory.block_size):
            first, keys, values, scores = memory.pop_block()
            if store is None:
                continue
            if self.method.position is not Position.TRUE:
                keys = rotary.unrotate(keys, first)  # stored position-free; rotated when read
            store.append(keys, values, self.method.summarize(keys, values, scores))

    def export_state(self) -> tuple[dict[str, int], dict[str, torch.Tensor]]:
        memory, store = self.memory, self.memory.store
        keys, values = memory.window.span()
        window = memory.window
        arrays = {"init_keys": memory.init_keys, "init_values": memory.init_values, "window_keys": keys,
                  "window_values": values, "window_scores": window.scores[:, window.begin:window.end]}
        if store is not None:
            # files keep summaries block-major [blocks, Hkv, ...] (format 1); the store holds them head-major
            arrays.update({f"summary.{name}": store.summary(name).transpose(0, 1) for name in store.summaries})
        ints = {"length": memory.length, "evicted": memory.evicted, "blocks": store.num_blocks if store else 0}
        return ints, arrays

    def import_state(self, ints: dict[str, int], arrays: dict[str, torch.Tensor]) -> None:
        memory, store = self.memory, self.memory.store
        device, dtype = memory.init_keys.device, memory.init_keys.dtype
        memory.init_keys = arrays["init_keys"].to(device, dtype)
        memory.init_values = arrays["init_values"].to(device, dtype)
        memory.window.adopt(arrays["window_keys"].to(device, dtype), arrays["window_values"].to(device, dtype),
                            arrays["window_scores"].to(device))
        memory.length, memory.evicted = ints["length"], ints["evicted"]
        if store is not None:
            store.restore(ints["blocks"], {name.split(".", 1)[1]: tensor.to(device).transpose(0, 1)
                                           for name, tensor in arrays.items() if name.startswith("summary.")})
            if store.num_blocks > self.method.topk:
                store.tiers.prefetch([(self.spec.index, i) for i in self.method.read_ahead(store, self.spec)])

    def nbytes(self) -> int:
        return self.memory.nbytes()
