"""Exact partial-attention merge: parts over disjoint key sets, merged by log-sum-exp, equal one
softmax over all keys; the CPU flash fast path equals the explicit reference."""

from __future__ import annotations

import pytest
import torch

from blockmem.attention.merge import merge, partial_attention, partial_attention_reference


def _qkv(dtype, heads=6, kv_heads=2, length=5, keys=23, dim=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, heads, length, dim, generator=g).to(dtype)
    k = torch.randn(1, kv_heads, keys, dim, generator=g).to(dtype)
    v = torch.randn(1, kv_heads, keys, dim, generator=g).to(dtype)
    return q, k, v


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_fast_partial_attention_matches_reference(causal, dtype, tol) -> None:
    q, k, v = _qkv(dtype, keys=5 if causal else 23)
    out, lse = partial_attention(q, k, v, 0.25, causal)
    ref_out, ref_lse = partial_attention_reference(q, k, v, 0.25, causal)
    assert out.dtype == dtype and lse.dtype == torch.float32
    assert (out.float() - ref_out.float()).abs().max() < tol
    assert (lse - ref_lse).abs().max() < 1e-4


@pytest.mark.parametrize("splits", [[10], [3, 15], [1, 7, 12]])
def test_merge_equals_one_softmax_over_the_union(splits) -> None:
    q, k, v = _qkv(torch.float32, keys=28)
    bounds = [0, *splits, 23]
    parts = [partial_attention(q, k[:, :, a:b], v[:, :, a:b], 0.3, causal=False) for a, b in zip(bounds, bounds[1:])]
    parts.append(partial_attention(q, k[:, :, 23:], v[:, :, 23:], 0.3, causal=True))  # the chunk's own 5 keys
    expected, _ = partial_attention_reference(q, k, v, 0.3, causal=True)
    out, lse = merge(parts)
    assert torch.allclose(out, expected, atol=1e-5)
    assert torch.allclose(lse, partial_attention_reference(q, k, v, 0.3, causal=True)[1], atol=1e-5)
