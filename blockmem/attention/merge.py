"""Attention over separate key sets, merged exactly through their log-sum-exps.

softmax over keys A ∪ B equals the two partial softmaxes reweighted: with per-query
out_i, lse_i for each part, lse = logaddexp(lse_a, lse_b) and
out = out_a * exp(lse_a - lse) + out_b * exp(lse_b - lse).
Sparse methods read sinks, selected blocks, a window and the current chunk as separate parts;
dense prefill uses it to attend a chunk's earlier keys without a mask and its own keys causally.

`partial_attention` uses the CPU flash-attention kernel, which returns the log-sum-exp, or for a
decode step's few query rows the native kernel of `attention/kernels` where it is built, and
falls back to `partial_attention_reference` (explicit float32 softmax) elsewhere; tests compare them.
"""

from __future__ import annotations

import torch

from blockmem.attention import kernels


def partial_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                                causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """q: [B, Hq, T, D]; k, v: [B, Hkv, S, D] -> (out [B, Hq, T, D] in q's dtype, lse [B, Hq, T] float32).

    `causal` aligns the last query with the last key (the chunk's own keys)."""
    groups = q.shape[1] // k.shape[1]
    k32 = k.float().repeat_interleave(groups, dim=1)
    v32 = v.float().repeat_interleave(groups, dim=1)
    scores = (q.float() @ k32.transpose(-1, -2)) * scale
    if causal:
        t, s = q.shape[2], k.shape[2]
        allowed = torch.ones(t, s, dtype=torch.bool, device=q.device).tril(s - t)
        scores = scores.masked_fill(~allowed, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    out = torch.softmax(scores, dim=-1) @ v32
    return out.to(q.dtype), lse


def _cpu_flash_available(q: torch.Tensor) -> bool:
    return q.device.type == "cpu" and hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu")


def partial_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                      causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as `partial_attention_reference`; causal parts must have as many keys as queries."""
    if not _cpu_flash_available(q):
        return partial_attention_reference(q, k, v, scale, causal)
    flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    batch, heads, length, dim = q.shape
    kv_heads = k.shape[1]
    if causal:  # the kernel has no GQA: repeat this part's (few) keys per query head
        groups = heads // kv_heads
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        return flash(q, k, v, 0.0, True, scale=scale)
    # Without a mask every query of a GQA group reads the same keys: stack the group's heads as
    # rows of one query block instead of repeating keys.
    if batch == 1 and (part := _kernel_part(q, k, v)) is not None:  # a decode step's few rows
        return _ungrouped(*kernels.attention([part], scale), q.shape)
    grouped = q.reshape(batch, kv_heads, heads // kv_heads * length, dim)
    out, lse = flash(grouped, k, v, 0.0, False, scale=scale)
    return out.reshape(batch, heads, length, dim), lse.reshape(batch, heads, length)


def attend_parts(parts: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
                 scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention over the union of several key sets without a mask, each read with its own query
    rotation: parts of (q [1, Hq, T, D], k, v [1, Hkv, S, D]) -> (out [1, Hq, T, D], lse [1, Hq, T]).
    Equals `merge` of each part's `partial_attention`; a decode step's parts go to the native
    kernel in one call. Parts without keys are skipped; at least one part must have keys."""
    parts = [part for part in parts if part[1].shape[2]]
    shape = parts[0][0].shape
    if shape[0] == 1:
        kernel_parts = [_kernel_part(*part) for part in parts]
        if all(part is not None for part in kernel_parts):
            return _ungrouped(*kernels.attention(kernel_parts, scale), shape)
    return merge([partial_attention(q, k, v, scale, causal=False) for q, k, v in parts])


def _kernel_part(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, kernels.KeySet] | None:
    """One sequence's q [1, Hq, T, D], k, v [1, Hkv, S, D] as the kernel takes them (q grouped to
    [Hkv, G*T, D]), or None where it cannot."""
    grouped = q.reshape(k.shape[1], -1, q.shape[-1])
    if grouped.shape[1] > kernels.MAX_ROWS:
        return None  # a prefill piece: no need to look at the keys
    keys = kernels.key_set(k[0], v[0])
    return (grouped, keys) if kernels.supports(grouped, [keys]) else None


def _ungrouped(out: torch.Tensor, lse: torch.Tensor, shape: torch.Size) -> tuple[torch.Tensor, torch.Tensor]:
    return out.reshape(shape), lse.reshape(shape[:-1])


def merge(parts: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Combine partial attentions over disjoint key sets into attention over their union:
    (out [B, Hq, T, D] in the parts' dtype, lse [B, Hq, T] float32)."""
    out, lse = parts[0]
    if len(parts) == 1:
        return out, lse
    out = out.float()
    for part_out, part_lse in parts[1:]:
        total = torch.logaddexp(lse, part_lse)
        out = out * torch.exp(lse - total).unsqueeze(-1) + part_out.float() * torch.exp(part_lse - total).unsqueeze(-1)
        lse = total
    return out.to(parts[0][0].dtype), lse
