"""The GPU path of the memory tiers: pinned host pages, copies on a side stream, a device cache.
These need a CUDA device and are skipped without one (CI has none); run them on a GPU machine
with `pytest tests/test_cuda.py`."""

from __future__ import annotations

import pytest
import torch

import blockmem
from blockmem.attention import create_method
from blockmem.memory.tiers import TierConfig

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

SMALL = dict(n_init=4, n_local=16, block_size=8, topk=2)


@pytest.fixture(scope="module")
def cuda_llama(tiny):
    directory, _ = tiny.get("llama")
    return blockmem.load(directory, device="cuda")


def _logits(engine: blockmem.Engine, ids: list[int], steps: int) -> tuple[list[torch.Tensor], dict]:
    cache = engine.new_cache()
    out = [engine.prefill(ids, cache)]
    for _ in range(steps):
        out.append(engine._forward([int(out[-1].argmax())], cache))
    stats = {}
    if cache.tiers is not None:
        cache.tiers.check()
        stats = cache.tiers.stats()
        if cache.tiers.disk is not None or cache.tiers.device_pool is not None:
            assert cache.tiers.host.pages.is_pinned()
    torch.cuda.synchronize()
    cache.close()
    return [t.cpu() for t in out], stats


@pytest.mark.parametrize("name", ["infllm", "blocksparse", "nosa", "quest"])
@pytest.mark.parametrize("budgets", ["ram", "device", "both"])
def test_cuda_tiers_compute_exactly_what_all_on_device_computes(cuda_llama, tmp_path, name, budgets) -> None:
    options = dict(SMALL, switch_length=0) if name in ("blocksparse", "nosa") else SMALL
    method = create_method(name, **options)
    ids = [(7 * i) % 250 + 3 for i in range(150)]
    reference, _ = _logits(blockmem.Engine(cuda_llama, method, prefill_chunk=32), ids, 6)
    page = 2 * cuda_llama.config.num_kv_heads * 8 * cuda_llama.config.head_dim * 4
    ram = 5 * page if budgets in ("ram", "both") else None
    device = 4 * page if budgets in ("device", "both") else None
    config = TierConfig(ram_budget=ram, device_budget=device, spill_dir=str(tmp_path) if ram else None)
    tiered, stats = _logits(blockmem.Engine(cuda_llama, method, prefill_chunk=32, tiers=config), ids, 6)
    assert all(torch.equal(a, b) for a, b in zip(reference, tiered, strict=True))
    if ram:
        assert stats["disk"]["bytes_read"] > 0
    if device:
        assert stats["device"]["misses"] > 0 and stats["device"]["resident_bytes"] <= device


def test_cuda_matches_cpu(cuda_llama, tiny_llama) -> None:
    method = create_method("infllm", **SMALL)
    ids = [(3 * i) % 250 + 3 for i in range(100)]
    gpu, _ = _logits(blockmem.Engine(cuda_llama, method, prefill_chunk=32), ids, 2)
    cpu, _ = _logits(blockmem.Engine(tiny_llama, method, prefill_chunk=32), ids, 2)
    assert all(torch.allclose(a, b, atol=1e-3) for a, b in zip(gpu, cpu, strict=True))
