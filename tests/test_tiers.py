"""Memory tiers: budgets hold, bookkeeping stays consistent under any sequence of appends and
fetches, and a run with tiers on computes exactly what the all-in-RAM run computes."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import blockmem
from blockmem.attention import create_method, kernels
from blockmem.errors import ConfigError
from blockmem.memory.tiers import TierConfig, Tiers, parse_size

SMALL = dict(n_init=4, n_local=16, block_size=8, topk=2)
PAGE = (2, 2, 4, 3)  # [keys/values, Hkv, block, D]
PAGE_BYTES = 2 * 2 * 4 * 3 * 4


def _page(layer: int, index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values whose every element names the block, so a wrong page shows."""
    base = torch.full((2, 4, 3), float(layer * 1000 + index))
    return base, -base


@pytest.mark.parametrize("text, expected", [("512MB", 512_000_000), ("1.5GiB", int(1.5 * 2 ** 30)), ("2g", 2 * 10 ** 9),
                                            ("65536", 65536), (" 64 kb ", 64_000), (None, None)])
def test_parse_size(text, expected) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["lots", "12XB", "-5MB", ""])
def test_parse_size_refuses_nonsense(text) -> None:
    with pytest.raises(ConfigError, match="as a size"):
        parse_size(text, "--ram-budget")


def test_budget_smaller_than_a_block_is_refused(tmp_path) -> None:
    with pytest.raises(ConfigError, match="smaller than one block"):
        Tiers(PAGE, torch.device("cpu"), torch.float32, TierConfig(ram_budget=PAGE_BYTES - 1, spill_dir=str(tmp_path)))


def test_device_budget_on_cpu_and_budgets_with_dense_are_refused() -> None:
    with pytest.raises(ConfigError, match="GPU"):
        Tiers(PAGE, torch.device("cpu"), torch.float32, TierConfig(device_budget=10 ** 6))
    with pytest.raises(ConfigError, match="block-memory methods"):
        create_method("dense").new_cache([], torch.device("cpu"), torch.float32, TierConfig(ram_budget=10 ** 6))


@settings(max_examples=40, deadline=None)
@given(pages=st.integers(1, 6), keep_important=st.booleans(),
       ops=st.lists(st.tuples(st.booleans(), st.integers(0, 2), st.lists(st.integers(0, 30), min_size=1, max_size=6)),
                    min_size=1, max_size=40))
def test_random_appends_and_fetches_keep_the_tiers_consistent(tmp_path_factory, pages, keep_important, ops) -> None:
    config = TierConfig(ram_budget=pages * PAGE_BYTES, spill_dir=str(tmp_path_factory.mktemp("spill")),
                        keep_important=keep_important)
    tiers = Tiers(PAGE, torch.device("cpu"), torch.float32, config)
    counts = [0, 0, 0]
    try:
        for append, layer, wanted in ops:
            if append:
                tiers.append(layer, counts[layer], *_page(layer, counts[layer]))
                counts[layer] += 1
            elif counts[layer]:
                ids = sorted({i % counts[layer] for i in wanted})[:pages]  # one step reads at most the pool
                got = tiers.fetch(layer, ids)
                for row, index in enumerate(ids):
                    keys, values = _page(layer, index)
                    assert torch.equal(got[row, 0], keys) and torch.equal(got[row, 1], values)
            tiers.check()
            assert tiers.host.nbytes() <= config.ram_budget
            assert all(tiers.holds((layer, i)) for layer in range(3) for i in range(counts[layer]))
        stats = tiers.stats()
        assert stats["disk"]["spilled_blocks"] == sum(counts)
        assert stats["ram"]["resident_blocks"] == min(pages, sum(counts))
    finally:
        tiers.close()
    assert not (tiers.disk.root).exists()  # spill files removed


def test_a_budget_below_one_steps_blocks_is_refused_up_front(tiny_llama, tmp_path) -> None:
    method = create_method("quest", **SMALL)  # per-head selection: a step reads up to topk * Hkv = 4 blocks
    page = 2 * tiny_llama.config.num_kv_heads * 8 * tiny_llama.config.head_dim * 4
    engine = blockmem.Engine(tiny_llama, method, tiers=TierConfig(ram_budget=3 * page, spill_dir=str(tmp_path)))
    with pytest.raises(ConfigError, match="one step may read 4"):
        engine.new_cache()


def test_a_step_reading_more_blocks_than_the_budget_holds_is_refused(tmp_path) -> None:
    tiers = Tiers(PAGE, torch.device("cpu"), torch.float32, TierConfig(ram_budget=2 * PAGE_BYTES, spill_dir=str(tmp_path)))
    for i in range(4):
        tiers.append(0, i, *_page(0, i))
    with pytest.raises(ConfigError, match="fewer than one step reads"):
        tiers.fetch(0, [0, 1, 2])
    tiers.close()


def test_lru_evicts_the_oldest_and_counts_hits(tmp_path) -> None:
    tiers = Tiers(PAGE, torch.device("cpu"), torch.float32, TierConfig(ram_budget=2 * PAGE_BYTES, spill_dir=str(tmp_path)))
    for i in range(3):  # block 0 is pushed out by block 2
        tiers.append(0, i, *_page(0, i))
    assert set(tiers.host.table) == {(0, 1), (0, 2)}
    tiers.fetch(0, [1])  # hit: block 1 becomes the newest
    tiers.fetch(0, [0])  # miss: read from disk, evicting block 2 (least recently used)
    assert set(tiers.host.table) == {(0, 0), (0, 1)}
    ram = tiers.stats()["ram"]
    assert (ram["hits"], ram["misses"], ram["evictions"]) == (1, 1, 2)
    assert tiers.stats()["disk"]["bytes_read"] == PAGE_BYTES
    tiers.close()


def _decode_logits(engine: blockmem.Engine, ids: list[int], steps: int) -> tuple[list[torch.Tensor], dict]:
    cache = engine.new_cache()
    logits = [engine.prefill(ids, cache)]
    for _ in range(steps):
        logits.append(engine._forward([int(logits[-1].argmax())], cache))
    stats = cache.tiers.stats() if cache.tiers is not None else {}
    if cache.tiers is not None:
        cache.tiers.check()
        if engine.tiers is not None and engine.tiers.ram_budget is not None:
            assert cache.tiers.host.nbytes() <= engine.tiers.ram_budget
    cache.close()
    return logits, stats


@pytest.mark.parametrize("name", ["infllm", "blocksparse", "nosa", "quest"])
def test_tiers_on_compute_exactly_what_all_in_ram_computes(tiny_llama, tmp_path, name) -> None:
    options = dict(SMALL, switch_length=0) if name in ("blocksparse", "nosa") else SMALL
    method = create_method(name, **options)
    ids = [(7 * i) % 250 + 3 for i in range(150)]
    reference, _ = _decode_logits(blockmem.Engine(tiny_llama, method, prefill_chunk=32), ids, 6)
    page = 2 * tiny_llama.config.num_kv_heads * 8 * tiny_llama.config.head_dim * 4
    config = TierConfig(ram_budget=5 * page, spill_dir=str(tmp_path))  # 5 of ~16 blocks per layer fit
    tiered, stats = _decode_logits(blockmem.Engine(tiny_llama, method, prefill_chunk=32, tiers=config), ids, 6)
    assert all(torch.equal(a, b) for a, b in zip(reference, tiered, strict=True))
    assert stats["disk"]["bytes_read"] > 0 and stats["ram"]["evictions"] > 0  # the disk tier was really used


@pytest.mark.skipif(not kernels.available(), reason=f"native kernel unavailable: {kernels.unavailable_reason()}")
@pytest.mark.parametrize("name", ["infllm", "blocksparse", "nosa", "quest"])
@pytest.mark.parametrize("budget", [None, 5])
def test_decode_reading_blocks_in_place_equals_copying_them(tiny_llama, tmp_path, monkeypatch, name, budget) -> None:
    """The native decode kernel reads selected blocks where the page pool holds them; torch's path
    copies them into a working set first. Same blocks, same logits (to float rounding)."""
    options = dict(SMALL, switch_length=0) if name in ("blocksparse", "nosa") else SMALL
    method = create_method(name, **options)
    ids = [(11 * i) % 250 + 3 for i in range(150)]
    page = 2 * tiny_llama.config.num_kv_heads * 8 * tiny_llama.config.head_dim * 4
    config = None if budget is None else TierConfig(ram_budget=budget * page, spill_dir=str(tmp_path))
    in_place, stats = _decode_logits(blockmem.Engine(tiny_llama, method, prefill_chunk=32, tiers=config), ids, 6)
    assert stats["blocks_read_in_place"] > 0
    monkeypatch.setattr(kernels, "available", lambda: False)
    copied, copied_stats = _decode_logits(blockmem.Engine(tiny_llama, method, prefill_chunk=32, tiers=config), ids, 6)
    assert copied_stats["blocks_read_in_place"] == 0 and copied_stats["blocks_fetched"] > 0
    assert all(torch.allclose(a, b, atol=1e-4) for a, b in zip(in_place, copied, strict=True))
    assert [int(x.argmax()) for x in in_place] == [int(x.argmax()) for x in copied]


def test_half_precision_storage_is_close_but_not_exact(tiny_llama) -> None:
    method = create_method("infllm", **SMALL)
    ids = [(5 * i) % 250 + 3 for i in range(120)]
    reference, _ = _decode_logits(blockmem.Engine(tiny_llama, method, prefill_chunk=32), ids, 2)
    half, stats = _decode_logits(blockmem.Engine(tiny_llama, method, prefill_chunk=32,
                                                 tiers=TierConfig(storage_dtype=torch.float16)), ids, 2)
    assert stats["storage_dtype"] == "float16"
    # float16 keys and values move this random model's logits by up to ~1.2e-2 (measured over
    # prefill and two steps, with and without pooled keys in the selection)
    assert not torch.equal(reference[-1], half[-1]) and torch.allclose(reference[-1], half[-1], atol=2e-2)


def test_run_reports_tier_stats(tiny_llama, tmp_path) -> None:
    config = TierConfig(ram_budget=4 * 2 * 2 * 8 * 16 * 4, spill_dir=str(tmp_path))
    out = blockmem.Engine(tiny_llama, create_method("infllm", **SMALL), prefill_chunk=32, tiers=config).generate(
        prompt_ids=list(range(3, 120)), max_new_tokens=4, ignore_eos=True)
    stats = out.stats
    assert stats.tiers["disk"]["spilled_blocks"] > 0 and stats.bytes_moved_per_token is not None
    assert stats.resident_kv_bytes < stats.kv_cache_bytes
    assert "MiB moved per token" in stats.tier_summary()
    assert not list(tmp_path.iterdir())  # the spill folder is gone once the run ends
