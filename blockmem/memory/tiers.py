"""Where memory blocks live: compute device -> host RAM pool -> disk, each under a byte budget.

A block is one layer's keys and values for `block_size` tokens, kept as one page
[2, Hkv, block, D] and named by the key (layer, block id). Three stores hold pages:

    PagePool on the compute device   a cache of recently read blocks (CUDA only; `device_budget`)
    PagePool in host RAM             preallocated pages (pinned when the device is CUDA); a cache
                                     when a disk store exists, else the only copy (`ram_budget`)
    DiskStore                        per-layer append-only files, plus the read-only block arrays
                                     of a saved memory (read in place with positioned reads)

The tier contract, which both store kinds follow:
    lookup(key)       where the block is in this tier (a page slot or offset), or None
    load(key, out)    copy the block into `out` (a disk read, a page copy)
    store(key, page)  put a copy here; a bounded cache evicts least-recently-used blocks first
    evict(key)        drop it (only a cache may: a colder tier still holds the block)
    check()           raise AssertionError if the tier's bookkeeping is inconsistent
Lifecycle: a block is written once by `Tiers.append` into the coldest tier that keeps blocks
(disk if there is one, else host RAM, else the device when no budget is set at all) and into the
warmer caches; `Tiers.fetch` finds each requested block in the warmest tier holding it and copies
it warmer; `Tiers.prefetch` reads blocks a method will want into RAM on a background thread;
caches evict to stay inside their budgets; `Tiers.close` removes the spill files.
Every copy between tiers is counted (`Tiers.stats`).
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import threading
import weakref
import zlib
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch

from blockmem.errors import ConfigError, MemoryFileError

Key = tuple[int, int]  # (layer, block id)
T = TypeVar("T")

_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "m": 1000 ** 2, "mb": 1000 ** 2, "g": 1000 ** 3, "gb": 1000 ** 3,
          "kib": 1024, "mib": 1024 ** 2, "gib": 1024 ** 3}


def parse_size(text: str | int | None, flag: str = "budget") -> int | None:
    """'512MB' -> 512_000_000, '1.5GiB', '2g', 4096 -> bytes; None stays None."""
    if text is None or isinstance(text, int):
        return text
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    if not match or match.group(2).lower() not in _UNITS:
        raise ConfigError(f"{flag}: cannot read {text!r} as a size", "write it like 512MB, 2GB, 1.5GiB or 65536")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


def format_size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


@dataclass(frozen=True)
class TierConfig:
    """Budgets for a block memory. With all fields unset, blocks stay on the compute device
    (one unbounded pool), as fast as possible. `ram_budget` bounds the host pool and spills
    blocks to `spill_dir`; `device_budget` (CUDA only) bounds the device cache, the host pool
    then holds every block unless `ram_budget` is set too. `storage_dtype` is the dtype blocks
    are kept in (default: the compute dtype; float16/bfloat16 halve the bytes at some accuracy).
    `keep_important`: evict the least-used of the oldest blocks instead of the oldest."""

    device_budget: int | None = None
    ram_budget: int | None = None
    spill_dir: str | None = None
    storage_dtype: torch.dtype | None = None
    keep_important: bool = False

    @property
    def tiered(self) -> bool:
        return self.device_budget is not None or self.ram_budget is not None


class PagePool:
    """Pages [capacity, *page_shape] on one device. `budget` None: grows by doubling and never
    evicts (it is then the only copy). Otherwise preallocated to budget // page bytes pages,
    evicting least-recently-used blocks (or, with `keep_important`, the least-used of the
    oldest eight) to make room."""

    def __init__(self, name: str, page_shape: tuple[int, ...], dtype: torch.dtype, device: torch.device,
                 budget: int | None, pin: bool = False, keep_important: bool = False) -> None:
        self.name, self.page_shape, self.dtype, self.device = name, page_shape, dtype, device
        self.page_bytes = torch.Size(page_shape).numel() * torch.empty(0, dtype=dtype).element_size()
        self.budget, self.keep_important, self.pin = budget, keep_important, pin
        capacity = 0 if budget is None else budget // self.page_bytes
        if budget is not None and capacity < 1:
            raise ConfigError(f"{name} budget {format_size(budget)} is smaller than one block "
                              f"({format_size(self.page_bytes)})", f"give at least {format_size(self.page_bytes)}")
        self.pages = torch.empty((capacity, *page_shape), dtype=dtype, device=device, pin_memory=pin)
        self.table: OrderedDict[Key, int] = OrderedDict()  # least recently used first
        self.free = list(range(capacity - 1, -1, -1))
        self.uses: dict[Key, int] = {}
        self.hits = self.misses = self.evictions = 0

    @property
    def capacity(self) -> int:
        return self.pages.shape[0]

    def lookup(self, key: Key) -> int | None:
        slot = self.table.get(key)
        if slot is None:
            self.misses += 1
            return None
        self.hits += 1
        self.table.move_to_end(key)
        self.uses[key] = self.uses.get(key, 0) + 1
        return slot

    def reserve(self, key: Key, keep: set[Key] | frozenset[Key] = frozenset()) -> int:
        """A slot for `key` (not yet resident), evicting a block not in `keep` if full."""
        if not self.free:
            if self.budget is None:
                self._grow()
            else:
                self.evict(self._victim(keep))
        slot = self.free.pop()
        self.table[key] = slot
        return slot

    def unreserve(self, key: Key) -> None:
        """Give back the slot `reserve` gave `key` when filling it failed."""
        self.free.append(self.table.pop(key))

    def store(self, key: Key, page: torch.Tensor, keep: set[Key] | frozenset[Key] = frozenset(),
              non_blocking: bool = False) -> int:
        slot = self.table.get(key)
        if slot is None:
            slot = self.reserve(key, keep)
        self.pages[slot].copy_(page, non_blocking=non_blocking)
        return slot

    def evict(self, key: Key) -> None:
        if self.budget is None:
            raise AssertionError(f"{self.name} pool holds the only copy of block {key}: it cannot evict")
        self.free.append(self.table.pop(key))
        self.uses.pop(key, None)
        self.evictions += 1

    def _victim(self, keep: set[Key] | frozenset[Key]) -> Key:
        candidates = [key for key in self.table if key not in keep]
        if not candidates:
            raise ConfigError(f"the {self.name} budget holds {self.capacity} blocks, fewer than one step reads",
                              f"raise the {self.name} budget")
        if self.keep_important:
            oldest = candidates[:8]
            return min(oldest, key=lambda k: self.uses.get(k, 0))
        return candidates[0]

    def _grow(self, capacity: int | None = None) -> None:
        """Reallocate with room for `capacity` pages (default: double). Pinned host memory is
        cached by CUDA once freed, so callers that know the final size should ask for it once."""
        capacity = capacity or max(16, 2 * self.capacity)
        grown = torch.empty((capacity, *self.page_shape), dtype=self.dtype, device=self.device, pin_memory=self.pin)
        grown[: self.capacity] = self.pages
        self.free = list(range(capacity - 1, self.capacity - 1, -1)) + self.free
        self.pages = grown

    def nbytes(self) -> int:
        return len(self.table) * self.page_bytes

    def check(self) -> None:
        slots = list(self.table.values())
        if len(set(slots)) != len(slots):
            raise AssertionError(f"{self.name}: two blocks share a page")
        if set(slots) & set(self.free) or len(slots) + len(self.free) != self.capacity:
            raise AssertionError(f"{self.name}: pages leaked or double-booked")
        if self.budget is not None and self.capacity * self.page_bytes > self.budget:
            raise AssertionError(f"{self.name}: {self.capacity} pages exceed the budget {self.budget}")

    def summary(self) -> dict[str, Any]:
        looked = self.hits + self.misses
        return {"resident_blocks": len(self.table), "resident_bytes": self.nbytes(), "budget_bytes": self.budget,
                "hits": self.hits, "misses": self.misses, "evictions": self.evictions,
                "hit_rate": round(self.hits / looked, 4) if looked else None}


@dataclass
class BaseBlocks:
    """The read-only block arrays of a saved memory: per layer, `count` pages at `offset` in
    the open file `fd`, with one crc32 per page checked the first time the page is read. The
    descriptor is this object's own (closed when it is collected), so a restored cache keeps
    reading after the file object it came from is closed."""

    fd: int
    path: Path
    offsets: dict[int, int]
    counts: dict[int, int]
    crcs: dict[int, list[int]]

    def __post_init__(self) -> None:
        weakref.finalize(self, os.close, self.fd)

    def read(self, layer: int, index: int, target: memoryview, check: bool = True) -> None:
        """Copy page `index` of `layer` into `target` (one page), checking its crc32 if `check`;
        a truncated or corrupt page raises MemoryFileError naming it."""
        fix = "rebuild the memory with `blockmem memory build`"
        if not read_at(self.fd, self.offsets[layer] + index * len(target), target):
            raise MemoryFileError(f"{self.path}: block {index} of layer {layer} lies past the end of the file "
                                  "(it is truncated)", fix)
        if check and zlib.crc32(target) != self.crcs[layer][index]:
            raise MemoryFileError(f"{self.path}: block {index} of layer {layer} fails its checksum "
                                  "(the file is corrupt)", fix)


class DiskStore:
    """Per-layer append-only spill files (`root`/layer-N.kv) and, below them, the blocks of a
    saved memory. Block i of layer l is in the saved memory when i < its count there."""

    def __init__(self, page_bytes: int, spill_dir: str | None, base: BaseBlocks | None = None) -> None:
        self.page_bytes, self.base = page_bytes, base
        parent = Path(spill_dir) if spill_dir else None
        if parent is not None:
            parent.mkdir(parents=True, exist_ok=True)
        self.root = Path(tempfile.mkdtemp(prefix="blockmem-spill-", dir=parent))
        self.files: dict[int, int] = {}
        self.counts: dict[int, int] = {}
        self.verified: set[Key] = set()
        self.bytes_written = self.bytes_read = 0
        self._cleanup = weakref.finalize(self, DiskStore._remove, self.root, self.files)

    @staticmethod
    def _remove(root: Path, files: dict[int, int]) -> None:
        for fd in files.values():
            os.close(fd)
        files.clear()
        shutil.rmtree(root, ignore_errors=True)

    def close(self) -> None:
        self._cleanup()

    def _base_count(self, layer: int) -> int:
        return self.base.counts.get(layer, 0) if self.base else 0

    def lookup(self, key: Key) -> int | None:
        layer, index = key
        if index < self._base_count(layer):
            return index
        index -= self._base_count(layer)
        return index if index < self.counts.get(layer, 0) else None

    def store(self, key: Key, page: torch.Tensor) -> None:
        layer, index = key
        if index != self._base_count(layer) + self.counts.get(layer, 0):
            raise AssertionError(f"disk: block {key} written out of order")
        fd = self.files.get(layer)
        if fd is None:
            fd = self.files[layer] = os.open(self.root / f"layer-{layer}.kv", os.O_RDWR | os.O_CREAT, 0o600)
        data = _bytes_view(page)
        written = os.pwrite(fd, data, self.counts.get(layer, 0) * self.page_bytes)
        if written != len(data):
            raise OSError(f"short write to {self.root} (disk full?)")
        self.counts[layer] = self.counts.get(layer, 0) + 1
        self.bytes_written += len(data)

    def load(self, key: Key, out: torch.Tensor) -> None:
        """Read block `key` into `out` (a contiguous CPU page)."""
        layer, index = key
        target = _bytes_view(out)
        if index < self._base_count(layer):
            self.base.read(layer, index, target, check=key not in self.verified)
            self.verified.add(key)
        else:
            if not read_at(self.files[layer], (index - self._base_count(layer)) * self.page_bytes, target):
                raise AssertionError(f"disk: short read of block {key}")
        self.bytes_read += self.page_bytes

    def check(self) -> None:
        for layer, fd in self.files.items():
            size = os.fstat(fd).st_size
            if size != self.counts[layer] * self.page_bytes:
                raise AssertionError(f"disk: layer {layer} spill file has {size} bytes for {self.counts[layer]} blocks")

    def summary(self) -> dict[str, Any]:
        return {"spilled_blocks": sum(self.counts.values()), "saved_blocks": sum(self.base.counts.values()) if
                self.base else 0, "bytes_written": self.bytes_written, "bytes_read": self.bytes_read,
                "spill_dir": str(self.root)}


def read_at(fd: int, offset: int, target: memoryview) -> bool:
    """Fill `target` with the file's bytes at `offset`; False if the file ends first. Positioned
    reads map nothing, so a block read from a saved memory stops counting towards this process's
    RSS once the page it was copied into is gone (a mapping kept faulted-around pages resident)."""
    done = 0
    while done < len(target):
        got = os.preadv(fd, [target[done:]], offset + done)
        if got <= 0:
            return False
        done += got
    return True


def _bytes_view(page: torch.Tensor) -> memoryview:
    """A writable byte view of a contiguous CPU tensor (any dtype, bfloat16 included)."""
    return memoryview(page.view(torch.uint8).numpy()).cast("B")


class Tiers:
    """Every layer's blocks for one sequence, in the tiers `config` asks for (see module doc)."""

    def __init__(self, page_shape: tuple[int, int, int, int], device: torch.device, dtype: torch.dtype,
                 config: TierConfig | None = None, base: BaseBlocks | None = None, step_blocks: int = 1) -> None:
        """`step_blocks`: the most blocks one step may read; every bounded tier must hold them."""
        config = config or TierConfig()
        self.config, self.page_shape, self.device, self.dtype = config, page_shape, device, dtype
        self.storage_dtype = config.storage_dtype or dtype
        cuda = device.type == "cuda"
        if config.device_budget is not None and not cuda:
            raise ConfigError("--device-budget applies to a GPU; on this CPU device the blocks live in RAM",
                              "use --ram-budget to bound the memory's RAM")
        self.device_pool: PagePool | None = None
        self.disk: DiskStore | None = None
        if not config.tiered and base is None:
            self.host = PagePool("device" if cuda else "ram", page_shape, self.storage_dtype, device, None)
            self.pages_on_device = True
        else:
            self.host = PagePool("ram", page_shape, self.storage_dtype, torch.device("cpu"), config.ram_budget,
                                 pin=cuda, keep_important=config.keep_important)
            self.pages_on_device = False
            if cuda:
                budget = config.device_budget
                self.device_pool = PagePool("device", page_shape, self.storage_dtype, device, budget,
                                            keep_important=config.keep_important) if budget else None
            if config.ram_budget is not None or base is not None:
                self.disk = DiskStore(self.host.page_bytes, config.spill_dir, base)
        self.page_bytes = self.host.page_bytes
        for pool, flag in ((self.host, "--ram-budget"), (self.device_pool, "--device-budget")):
            if pool is not None and pool.budget is not None and pool.capacity < step_blocks:
                need = step_blocks * self.page_bytes
                raise ConfigError(f"{flag} {format_size(pool.budget)} holds {pool.capacity} blocks, but one step may "
                                  f"read {step_blocks} ({format_size(need)})", f"give {flag} at least {format_size(need)}")
        self.stream = torch.cuda.Stream(device) if cuda and not self.pages_on_device else None
        self._copies_done: torch.cuda.Event | None = None  # last host->device copy batch
        self.bytes_to_compute = 0  # pages copied to the compute device's working set
        self.blocks_fetched = 0
        self.blocks_read_in_place = 0  # blocks a kernel read where the pool holds them (no copy)
        # Read-ahead: one background thread reads blocks from disk into a staging page (holding
        # only the disk lock), then inserts them into the host pool under the pool lock, which
        # every fetch and append also holds.
        self._lock = threading.RLock()
        self._disk_lock = threading.Lock()
        self._reader: ThreadPoolExecutor | None = None
        self._reads: list[Future] = []
        self.prefetched = 0

    # -- writing ---------------------------------------------------------------------------------
    def append(self, layer: int, index: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Block `index` of `layer` (blocks of a layer arrive in order). keys, values: [Hkv, block, D]."""
        page = torch.stack([keys, values]).to(self.storage_dtype)
        key = (layer, index)
        with self._lock:
            self._append(key, page)

    def _append(self, key: Key, page: torch.Tensor) -> None:
        if self.disk is not None:
            if self.disk.lookup(key) is not None:
                return  # already on disk: a saved memory's block
            cpu_page = page.cpu() if page.device.type != "cpu" else page.contiguous()
            self.disk.store(key, cpu_page)
            self._host_write_barrier()
            self.host.store(key, cpu_page)
        elif self.pages_on_device:
            self.host.store(key, page)
        else:
            self._host_write_barrier()
            self.host.store(key, page.cpu())

    # -- reading ---------------------------------------------------------------------------------
    def fetch(self, layer: int, ids: list[int]) -> torch.Tensor:
        """Pages of blocks `ids` of `layer` on the compute device in the compute dtype:
        [len(ids), 2, Hkv, block, D]."""
        with self._lock:
            return self._fetch(layer, ids)

    def fetch_each(self, layer: int, ids: list[int], take: Callable[[int, torch.Tensor], None]) -> None:
        """Like `fetch`, but hands page i to `take(i, page)` instead of gathering the pages into a
        new tensor: where the host pool serves the compute device (CPU, or no tiers) the page is
        the pool's own, in the storage dtype, so `take` must copy out of it before returning."""
        if self.pool_serves_compute:
            def each(pages: torch.Tensor, slots: list[int]) -> None:
                for i, slot in enumerate(slots):
                    take(i, pages[slot])

            self._in_pool(layer, ids, each, copied=True)
            return
        pages = self.fetch(layer, ids)
        for i in range(len(ids)):
            take(i, pages[i])

    def read_in_place(self, layer: int, ids: list[int], use: Callable[[torch.Tensor, list[int]], T]) -> T:
        """`use(pages, slots)` with the host pool's pages [capacity, 2, Hkv, block, D] and the slot
        of each block of `ids` (read from disk where missing), the pool held still meanwhile (no
        eviction, no read-ahead insert); returns what `use` returns. For readers that work on the
        pages where they lie (the CPU decode kernel): nothing is copied, so these reads count as
        `blocks_read_in_place`, not as bytes moved. Only where `pool_serves_compute`."""
        if not self.pool_serves_compute:
            raise AssertionError("read_in_place: the host pool is not on the compute device")
        return self._in_pool(layer, ids, use, copied=False)

    def _in_pool(self, layer: int, ids: list[int], use: Callable[[torch.Tensor, list[int]], T], copied: bool) -> T:
        with self._lock:
            if not copied:
                self.blocks_read_in_place += len(ids)
            slots = self._host_slots(layer, ids, copied)  # may grow the pool: read host.pages after
            return use(self.host.pages, slots)

    @property
    def pool_serves_compute(self) -> bool:
        """True where the host pool's pages are on the compute device (the CPU, or no tiers)."""
        return self.pages_on_device or self.device.type == "cpu"

    def _host_slots(self, layer: int, ids: list[int], copied: bool = True) -> list[int]:
        """Host pool slots of these blocks (read from disk where missing), counted as fetched
        (`copied`: into a working set)."""
        if copied:
            self.blocks_fetched += len(ids)
            self.bytes_to_compute += len(ids) * self.page_bytes
        if self.pages_on_device:
            return [self.host.table[(layer, i)] for i in ids]
        return self._ensure_host([(layer, i) for i in ids])

    def _fetch(self, layer: int, ids: list[int]) -> torch.Tensor:
        host_slots = self._host_slots(layer, ids)  # may grow the pool: read host.pages after
        if self.pool_serves_compute:
            return self._index(self.host.pages, host_slots)
        return self._to_device([(layer, i) for i in ids], host_slots)

    def preload(self) -> None:
        """Read every block on disk into the host pool (it must hold them all)."""
        if self.disk is None:
            return
        counts = dict(self.disk.base.counts) if self.disk.base else {}
        for layer, count in self.disk.counts.items():
            counts[layer] = counts.get(layer, 0) + count
        if self.host.budget is not None and sum(counts.values()) > self.host.capacity:
            raise ConfigError(f"preloading needs {format_size(sum(counts.values()) * self.page_bytes)} of RAM, more "
                              f"than --ram-budget {format_size(self.host.budget)}", "raise or drop the RAM budget")
        self.wait_prefetch()
        needed = sum(counts.values())
        if self.host.budget is None and self.host.capacity < needed:
            self.host._grow(needed)  # one allocation of the final size
        with self._lock:
            for layer, count in counts.items():
                self._ensure_host([(layer, index) for index in range(count)])
        self.host.hits = self.host.misses = 0
        self.disk.bytes_read = 0

    def _index(self, pages: torch.Tensor, slots: list[int]) -> torch.Tensor:
        picked = pages.index_select(0, torch.tensor(slots, device=pages.device))
        return picked if picked.dtype == self.dtype else picked.to(self.dtype)

    def _ensure_host(self, keys: list[Key]) -> list[int]:
        """Host slots of `keys`, reading the missing ones from disk."""
        wanted = set(keys)
        slots = []
        for key in keys:
            slot = self.host.lookup(key)
            if slot is None:
                if self.disk is None or self.disk.lookup(key) is None:
                    raise AssertionError(f"block {key} is in no tier")
                self._host_write_barrier()
                slot = self.host.reserve(key, wanted)
                try:
                    with self._disk_lock:
                        self.disk.load(key, self.host.pages[slot])
                except BaseException:
                    self.host.unreserve(key)  # the page holds no valid copy of the block
                    raise
            slots.append(slot)
        return slots

    def prefetch(self, keys: list[Key]) -> None:
        """Read these blocks from disk into RAM in the background, so the fetch that wants them
        finds them there (a method calls this with blocks it will read whatever the query, such as
        NOSA's query-agnostic ones). Never blocks; does nothing without a disk tier."""
        if self.disk is None or not keys:
            return
        with self._lock:
            todo = [key for key in keys if key not in self.host.table and self.disk.lookup(key) is not None]
        if self.host.budget is not None:
            todo = todo[: self.host.capacity // 2]  # never crowd out more than half the pool
        if not todo:
            return
        if self._reader is None:
            self._reader = ThreadPoolExecutor(1, thread_name_prefix="blockmem-prefetch")
        self._reads.append(self._reader.submit(self._read_ahead, todo))

    def _read_ahead(self, keys: list[Key]) -> None:
        staging = torch.empty(self.page_shape, dtype=self.storage_dtype)
        for key in keys:
            with self._lock:
                if key in self.host.table:
                    continue
            with self._disk_lock:
                self.disk.load(key, staging)
            with self._lock:
                if key in self.host.table:
                    continue
                self._host_write_barrier()
                self.host.store(key, staging)
                self.prefetched += 1

    def wait_prefetch(self) -> None:
        """Block until every read-ahead issued so far is done (re-raising its error, if any)."""
        reads, self._reads = self._reads, []
        for read in reads:
            read.result()

    def _host_write_barrier(self) -> None:
        """Before a pinned host page is overwritten, let copies still reading it finish."""
        if self._copies_done is not None:
            self._copies_done.synchronize()
            self._copies_done = None

    def _to_device(self, keys: list[Key], host_slots: list[int]) -> torch.Tensor:
        """CUDA: host pages -> device on the side stream; the compute stream waits for them."""
        compute = torch.cuda.current_stream(self.device)
        assert self.stream is not None
        self.stream.wait_stream(compute)  # device pages about to be overwritten are no longer read
        if self.device_pool is None:
            out = torch.empty((len(keys), *self.page_shape), dtype=self.storage_dtype, device=self.device)
            with torch.cuda.stream(self.stream):
                for i, slot in enumerate(host_slots):
                    out[i].copy_(self.host.pages[slot], non_blocking=True)
            out.record_stream(compute)
        else:
            wanted, device_slots = set(keys), []
            with torch.cuda.stream(self.stream):
                for key, slot in zip(keys, host_slots):
                    found = self.device_pool.lookup(key)
                    if found is None:
                        found = self.device_pool.store(key, self.host.pages[slot], wanted, non_blocking=True)
                    device_slots.append(found)
            out = None
        event = torch.cuda.Event()
        event.record(self.stream)
        self._copies_done = event
        compute.wait_event(event)
        if out is None:
            return self._index(self.device_pool.pages, device_slots)
        return out if out.dtype == self.dtype else out.to(self.dtype)

    def read_authoritative(self, layer: int, index: int) -> torch.Tensor:
        """One block's page on the CPU, from its coldest copy, without touching caches or counters
        (for saving a memory)."""
        key = (layer, index)
        if self.disk is not None and self.disk.lookup(key) is not None:
            page = torch.empty(self.page_shape, dtype=self.storage_dtype)
            self.disk.load(key, page)
            self.disk.bytes_read -= self.page_bytes
            return page
        return self.host.pages[self.host.table[key]].cpu()

    # -- bookkeeping -----------------------------------------------------------------------------
    def holds(self, key: Key) -> bool:
        """True if some tier keeps `key` for good (not only a cache)."""
        if self.disk is not None and self.disk.lookup(key) is not None:
            return True
        return self.host.budget is None and key in self.host.table

    def close(self) -> None:
        if self._reader is not None:
            self._reader.shutdown(wait=True, cancel_futures=True)
            self._reader = None
        if self.disk is not None:
            self.disk.close()

    def check(self) -> None:
        self.host.check()
        if self.device_pool is not None:
            self.device_pool.check()
        if self.disk is not None:
            self.disk.check()

    def stored_bytes(self) -> int:
        """Bytes of every block held, wherever (each counted once)."""
        if self.disk is not None:
            return (sum(self.disk.counts.values()) + (sum(self.disk.base.counts.values()) if self.disk.base else 0)
                    ) * self.page_bytes
        return self.host.nbytes()

    def resident_bytes(self) -> int:
        return self.host.nbytes() + (self.device_pool.nbytes() if self.device_pool else 0)

    def bytes_moved(self) -> int:
        """Bytes copied between tiers so far: disk -> RAM, RAM -> device cache, and into the
        compute working set."""
        disk = self.disk.bytes_read if self.disk else 0
        device = self.device_pool.misses * self.page_bytes if self.device_pool else 0
        return disk + device + self.bytes_to_compute

    def stats(self) -> dict[str, Any]:
        out: dict[str, Any] = {"page_bytes": self.page_bytes, "storage_dtype": str(self.storage_dtype).removeprefix("torch."),
                               "blocks_fetched": self.blocks_fetched, "bytes_to_compute": self.bytes_to_compute,
                               "blocks_read_in_place": self.blocks_read_in_place,
                               "prefetched_blocks": self.prefetched,
                               "bytes_moved": self.bytes_moved()}
        out[self.host.name] = self.host.summary()
        if self.device_pool is not None:
            out["device"] = self.device_pool.summary()
        if self.disk is not None:
            out["disk"] = self.disk.summary()
        return out
