"""One plain decoder for the Llama family; every difference between families is a config switch.

Families: Llama 2/3/3.1, Mistral, Qwen2/2.5 (QKV bias), Qwen3 (q/k norm), SmolLM2, MiniCPM
(embedding/residual/logit scales), Gemma 3 (sliding/global layers, q/k norm, GeGLU, sandwich
norms, scaled embeddings). Attention goes through `attention.base.LayerCache.attend`, the single
call site where methods plug in.
"""

from __future__ import annotations

import enum

import torch
import torch.nn as nn

from blockmem.attention.base import KVCache, LayerCache, LayerSpec
from blockmem.config import ModelConfig
from blockmem.model.layers import Embedding, GatedMLP, Linear, RMSNorm
from blockmem.model.rope import Rotary


class Logits(enum.Enum):
    ALL = "all"  # every position (scoring, tests)
    LAST = "last"  # only the last position (generation: skips the vocabulary matmul for the rest)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.qkv = Linear(cfg.hidden_size, cfg.q_size + 2 * cfg.kv_size, cfg.qkv_bias)
        self.o = Linear(cfg.q_size, cfg.hidden_size, cfg.o_bias)
        self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else None

    def forward(self, x: torch.Tensor, cache: LayerCache, rotary: Rotary, start: int) -> torch.Tensor:
        # x: [B, T, hidden]
        batch, length, _ = x.shape
        cfg = self.cfg
        q, k, v = self.qkv(x).split([cfg.q_size, cfg.kv_size, cfg.kv_size], dim=-1)
        q = q.view(batch, length, cfg.num_heads, cfg.head_dim).transpose(1, 2)
        k = k.view(batch, length, cfg.num_kv_heads, cfg.head_dim).transpose(1, 2)
        v = v.view(batch, length, cfg.num_kv_heads, cfg.head_dim).transpose(1, 2)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        out = cache.attend(q, k, v, rotary, start)  # [B, Hq, T, D]
        return self.o(out.transpose(1, 2).reshape(batch, length, cfg.q_size))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        eps = cfg.rms_norm_eps
        self.attn_norm = RMSNorm(cfg.hidden_size, eps)
        self.attn = Attention(cfg)
        self.mlp_norm = RMSNorm(cfg.hidden_size, eps)
        self.mlp = GatedMLP(cfg.hidden_size, cfg.intermediate_size, cfg.activation, cfg.mlp_bias)
        self.post_attn_norm = RMSNorm(cfg.hidden_size, eps) if cfg.sandwich_norm else None
        self.post_mlp_norm = RMSNorm(cfg.hidden_size, eps) if cfg.sandwich_norm else None
        self.residual_scale = cfg.residual_scale

    def forward(self, x: torch.Tensor, cache: LayerCache, rotary: Rotary, start: int) -> torch.Tensor:
        h = self.attn(self.attn_norm(x), cache, rotary, start)
        if self.post_attn_norm is not None:
            h = self.post_attn_norm(h)
        x = x + h * self.residual_scale if self.residual_scale != 1.0 else x + h
        h = self.mlp(self.mlp_norm(x))
        if self.post_mlp_norm is not None:
            h = self.post_mlp_norm(h)
        return x + h * self.residual_scale if self.residual_scale != 1.0 else x + h


class Decoder(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed = Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.head = None if cfg.tie_embeddings else Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        rotaries: dict[object, Rotary] = {}
        for i in range(cfg.num_layers):
            rope = cfg.rope_for_layer(i)
            rotaries.setdefault(rope, Rotary(rope, cfg.head_dim))
        self.rotary = [rotaries[cfg.rope_for_layer(i)] for i in range(cfg.num_layers)]

    def layer_specs(self) -> list[LayerSpec]:
        cfg = self.cfg
        return [LayerSpec(i, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.attn_scale, cfg.layer_windows[i])
                for i in range(cfg.num_layers)]

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.table.dtype

    @property
    def device(self) -> torch.device:
        return self.embed.table.device

    def forward(self, ids: torch.Tensor, cache: KVCache, logits: Logits = Logits.ALL) -> torch.Tensor:
        """ids: [B, T] int64 -> logits [B, T or 1, vocab] float32; appends the chunk to `cache`."""
        start = cache.length
        x = self.embed(ids)
        if self.cfg.embed_scale != 1.0:
            x = x * torch.tensor(self.cfg.embed_scale, dtype=x.dtype)
        for block, layer_cache, rotary in zip(self.layers, cache.layers, self.rotary):
            x = block(x, layer_cache, rotary, start)
        cache.advance(ids.shape[1])
        if logits is Logits.LAST:
            x = x[:, -1:]
        x = self.norm(x)
        out = (self.embed.as_head(x) if self.head is None else self.head(x)).float()
        if self.cfg.logit_scale != 1.0:
            out = out * self.cfg.logit_scale
        if self.cfg.final_logit_softcap is not None:
            cap = self.cfg.final_logit_softcap
            out = torch.tanh(out / cap) * cap
        return out

    def pack(self) -> int:
        """Switch linear layers (and a tied head) to the CPU fast path; returns how many switched."""
        packed = sum(module.pack() for module in self.modules() if isinstance(module, Linear))
        return packed + (self.embed.pack() if self.head is None else 0)
