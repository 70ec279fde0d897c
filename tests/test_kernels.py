"""The native decode-attention kernel against the torch reference it replaces, and its fallbacks."""

from __future__ import annotations

import os
import shutil

import pytest
import torch

from blockmem.attention import kernels
from blockmem.attention.merge import attend_parts, merge, partial_attention, partial_attention_reference

HAS_COMPILER = shutil.which(os.environ.get("CC") or "cc") is not None


def _part(kv_heads: int, group: int, length: int, keys: int, dtype: torch.dtype, seed: int, offset: int = 0):
    """q [1, Hq, T, D] float32 and keys/values that are strided views into larger buffers (as a
    window's span is), [1, Hkv, keys, D] in `dtype`."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, kv_heads * group, length, 64, generator=g)
    k = torch.randn(1, kv_heads, keys + offset + 5, 64, generator=g).to(dtype)[:, :, offset:offset + keys]
    v = torch.randn(1, kv_heads, keys + offset + 7, 64, generator=g).to(dtype)[:, :, offset:offset + keys]
    return q, k, v


@pytest.mark.skipif(not HAS_COMPILER, reason="no C compiler: the kernel cannot be built here")
def test_kernel_builds_where_a_compiler_exists() -> None:
    assert kernels.available(), kernels.unavailable_reason()


@pytest.mark.skipif(not HAS_COMPILER, reason="no C compiler: the kernel cannot be built here")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("keys", [[1], [127], [128, 129], [2101, 300, 64]])
@pytest.mark.parametrize("group,length", [(1, 1), (3, 1), (4, 8)])
def test_kernel_equals_one_softmax_over_all_parts(dtype, keys, group, length) -> None:
    parts = [_part(3, group, length, n, dtype, seed=i, offset=3 * i) for i, n in enumerate(keys)]
    grouped = [(q.reshape(3, -1, 64), kernels.key_set(k[0], v[0])) for q, k, v in parts]
    assert kernels.supports(grouped[0][0], [keys for _, keys in grouped])
    out, lse = kernels.attention(grouped, 0.125)
    # float32 queries over keys and values stored in `dtype`, as the kernel reads them
    expected, expected_lse = merge([partial_attention_reference(q, k, v, 0.125, False) for q, k, v in parts])
    assert out.dtype == torch.float32 and lse.dtype == torch.float32
    assert (out.reshape(expected.shape) - expected.float()).abs().max() < 1e-5
    assert (lse.reshape(expected_lse.shape) - expected_lse).abs().max() < 1e-5


@pytest.mark.skipif(not HAS_COMPILER, reason="no C compiler: the kernel cannot be built here")
def test_attention_paths_route_decode_steps_to_the_kernel(monkeypatch) -> None:
    calls = []
    real = kernels.attention
    monkeypatch.setattr(kernels, "attention", lambda parts, scale: calls.append(len(parts)) or real(parts, scale))
    decode = [_part(3, 3, 1, 700, torch.float32, seed=i) for i in range(2)]
    out, lse = attend_parts(decode, 0.125)
    expected, expected_lse = merge([partial_attention_reference(q, k, v, 0.125, False) for q, k, v in decode])
    assert calls == [2] and torch.allclose(out, expected, atol=1e-5) and torch.allclose(lse, expected_lse, atol=1e-5)
    partial_attention(*decode[0], 0.125, False)
    assert calls == [2, 1]
    partial_attention(*_part(3, 3, 64, 700, torch.float32, seed=3), 0.125, False)  # 192 rows: a prefill piece
    assert calls == [2, 1]
    empty = _part(3, 3, 1, 0, torch.float32, seed=4)
    out2, _ = attend_parts([decode[0], empty], 0.125)  # a part without keys contributes nothing
    assert torch.allclose(out2, partial_attention_reference(*decode[0], 0.125, False)[0], atol=1e-5)


def test_unsupported_inputs_fall_back_to_torch() -> None:
    q, k, v = _part(2, 2, 1, 50, torch.float16, seed=0)
    assert kernels.key_set(k[0], v[0]) is None  # float16: not a kernel dtype
    q32, k32, v32 = _part(2, 2, 1, 50, torch.float32, seed=0)
    assert kernels.key_set(k32[0].transpose(1, 2).contiguous().transpose(1, 2), v32[0]) is None  # rows not contiguous
    assert kernels.key_set(k32[0, :, :0], v32[0, :, :0]) is None  # no keys
    keys = kernels.key_set(k32[0], v32[0])
    assert not kernels.supports(torch.zeros(2, kernels.MAX_ROWS + 1, 64), [keys])  # a prefill piece's rows
    assert not kernels.supports(q32.reshape(2, -1, 64), [keys, kernels.key_set(k32[0].bfloat16(), v32[0].bfloat16())])
    out, lse = attend_parts([(q32.half(), k, v)], 0.5)
    ref, ref_lse = partial_attention_reference(q32.half(), k, v, 0.5, False)
    assert (out.float() - ref.float()).abs().max() < 2e-3 and (lse - ref_lse).abs().max() < 1e-3


@pytest.fixture
def fresh_kernels(monkeypatch, tmp_path):
    """The module with nothing loaded yet and an empty cache folder (restored afterwards)."""
    monkeypatch.setattr(kernels, "_library", None)
    monkeypatch.setattr(kernels, "_reason", None)
    monkeypatch.setenv("BLOCKMEM_CACHE", str(tmp_path))
    return tmp_path


def test_kernels_can_be_turned_off(fresh_kernels, monkeypatch) -> None:
    monkeypatch.setenv("BLOCKMEM_KERNELS", "0")
    assert not kernels.available()
    assert "BLOCKMEM_KERNELS=0" in kernels.unavailable_reason()
    q, k, v = _part(3, 3, 1, 300, torch.float32, seed=1)
    out, lse = partial_attention(q, k, v, 0.125, False)  # PyTorch's kernel instead
    ref, ref_lse = partial_attention_reference(q, k, v, 0.125, False)
    assert torch.allclose(out, ref, atol=1e-5) and torch.allclose(lse, ref_lse, atol=1e-5)


def test_a_missing_compiler_is_a_reason_not_an_error(fresh_kernels, monkeypatch) -> None:
    monkeypatch.setenv("CC", "no-such-compiler-blockmem")
    assert not kernels.available()
    assert "no C compiler (no-such-compiler-blockmem)" in kernels.unavailable_reason()
    assert not list(fresh_kernels.rglob("*.so"))


@pytest.mark.skipif(not HAS_COMPILER, reason="no C compiler: the kernel cannot be built here")
def test_a_failing_build_is_a_reason_and_a_build_is_cached(fresh_kernels, monkeypatch) -> None:
    flags = kernels._FLAGS
    monkeypatch.setattr(kernels, "_FLAGS", [*flags, "-include", "/nonexistent/blockmem.h"])
    assert not kernels.available()
    assert "building the decode-attention kernel failed" in kernels.unavailable_reason()
    monkeypatch.setattr(kernels, "_FLAGS", flags)
    monkeypatch.setattr(kernels, "_reason", None)
    assert kernels.available()
    built = list((fresh_kernels / "kernels").glob("decode_attention-*.so"))
    assert len(built) == 1 and kernels._build() == built[0]  # the next load reuses it


@pytest.mark.skipif(not HAS_COMPILER, reason="no C compiler: the kernel cannot be built here")
def test_a_damaged_cached_build_is_rebuilt(fresh_kernels) -> None:
    built = kernels._build()  # built, not loaded (overwriting a loaded library would break this process)
    built.write_bytes(b"not a shared library")  # a truncated or corrupted cache entry
    assert kernels.available(), kernels.unavailable_reason()
    assert built.read_bytes() != b"not a shared library"  # rebuilt in place of the damaged file
