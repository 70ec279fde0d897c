"""GGUF model files: metadata -> ModelConfig, tensors -> canonical names, dequantized to float32.

llama.cpp conventions handled here:
- `llama` and `minicpm` files store Q/K rows permuted for interleaved RoPE; we undo it so the
  decoder's rotate-half RoPE applies (qwen2/qwen3/gemma3 use rotate-half already).
- Gemma norm weights are stored as (1 + w), which is what our RMSNorm multiplies by.
- Gemma 3 files omit what llama.cpp hard-codes: every 6th layer global, local RoPE base 10000,
  sqrt(hidden) embedding scale. Newer files may state the pattern and base; those win.
- Llama 3.1 scaling arrives as a `rope_freqs` tensor of per-frequency divisors.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator

import torch

from blockmem.config import Activation, Family, ModelConfig, RopeConfig, RopeKind
from blockmem.errors import ModelError
from blockmem.model.dequant import dequantize
from blockmem.model.gguf_file import GGUFFile
from blockmem.model.hf import SUPPORTED

_FAMILIES = {"llama": Family.LLAMA, "qwen2": Family.QWEN2, "qwen3": Family.QWEN3, "minicpm": Family.MINICPM,
             "gemma3": Family.GEMMA3}
_PERMUTED = {Family.LLAMA, Family.MISTRAL, Family.MINICPM}

_TOP = {"token_embd.weight": "embed.weight", "output_norm.weight": "norm.weight", "output.weight": "head.weight"}
_BLOCK = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")
_BLOCK_NAMES = {
    "attn_norm": "attn_norm", "attn_q": "attn.q", "attn_k": "attn.k", "attn_v": "attn.v", "attn_output": "attn.o",
    "attn_q_norm": "attn.q_norm", "attn_k_norm": "attn.k_norm", "post_attention_norm": "post_attn_norm",
    "ffn_norm": "mlp_norm", "ffn_gate": "mlp.gate", "ffn_up": "mlp.up", "ffn_down": "mlp.down",
    "post_ffw_norm": "post_mlp_norm",
}


def family_of(gguf: GGUFFile) -> Family:
    arch = gguf.metadata.get("general.architecture", "?")
    if arch not in _FAMILIES:
        raise ModelError(f"{gguf.path}: unsupported architecture {arch!r}", f"blockmem supports {SUPPORTED}")
    family = _FAMILIES[arch]
    if family is Family.LLAMA and "mistral" in str(gguf.metadata.get("general.name", "")).lower():
        return Family.MISTRAL
    return family


def _rope(gguf: GGUFFile, arch: str, head_dim: int) -> RopeConfig:
    meta = gguf.metadata
    theta = float(meta.get(f"{arch}.rope.freq_base", 10000.0))
    if "rope_freqs.weight" in gguf.tensors:
        info = gguf.tensors["rope_freqs.weight"]
        divisors = dequantize(gguf.raw(info.name), info.ggml_type, info.shape, info.name)
        if divisors.numel() != head_dim // 2:
            raise ModelError(f"{gguf.path}: rope_freqs has {divisors.numel()} values, expected {head_dim // 2}")
        return RopeConfig(theta, freq_divisors=tuple(divisors.tolist()))
    kind = meta.get(f"{arch}.rope.scaling.type", "none")
    if kind in ("none", ""):
        return RopeConfig(theta)
    if kind == "linear":
        return RopeConfig(theta, RopeKind.LINEAR, factor=float(meta[f"{arch}.rope.scaling.factor"]))
    raise ModelError(f"{gguf.path}: RoPE scaling {kind!r} is not supported", "supported: none, linear, llama3")


def _gemma_windows(gguf: GGUFFile, arch: str, layers: int) -> tuple[int | None, ...]:
    window = int(gguf.metadata.get(f"{arch}.attention.sliding_window", 4096))
    pattern = gguf.metadata.get(f"{arch}.attention.sliding_window_pattern", 6)
    if isinstance(pattern, list):  # newer files: one flag per layer, True where sliding
        return tuple(window if sliding else None for sliding in pattern)
    return tuple(None if (i + 1) % int(pattern) == 0 else window for i in range(layers))


def config_from_gguf(gguf: GGUFFile) -> ModelConfig:
    meta, family = gguf.metadata, family_of(gguf)
    arch = meta["general.architecture"]

    def key(name: str, default: object = None) -> object:
        value = meta.get(f"{arch}.{name}", default)
        if value is None:
            raise ModelError(f"{gguf.path} lacks metadata {arch}.{name}", "the file is incomplete or not a model")
        return value

    hidden, heads, layers = int(key("embedding_length")), int(key("attention.head_count")), int(key("block_count"))
    head_dim = int(key("attention.key_length", hidden // heads))
    vocab = int(meta.get(f"{arch}.vocab_size", len(meta.get("tokenizer.ggml.tokens", []))))
    gemma, minicpm = family is Family.GEMMA3, family is Family.MINICPM
    attn_scale = float(meta.get(f"{arch}.attention.scale", 0.0))  # an explicit q.k multiplier wins
    if gemma and not attn_scale:  # llama.cpp: 27B scales queries by hidden/heads, smaller ones by head_dim
        attn_scale = (hidden / heads if layers == 62 else head_dim) ** -0.5
    return ModelConfig(
        family=family, vocab_size=vocab, hidden_size=hidden, intermediate_size=int(key("feed_forward_length")),
        num_layers=layers, num_heads=heads, num_kv_heads=int(key("attention.head_count_kv", heads)),
        head_dim=head_dim, max_context=int(key("context_length", 4096)),
        rms_norm_eps=float(key("attention.layer_norm_rms_epsilon", 1e-6)), rope=_rope(gguf, arch, head_dim),
        local_rope=RopeConfig(float(key("rope.freq_base_swa", 10000.0))) if gemma else None,
        layer_windows=_gemma_windows(gguf, arch, layers) if gemma else (),
        tie_embeddings="output.weight" not in gguf.tensors,
        qkv_bias="blk.0.attn_q.bias" in gguf.tensors, o_bias="blk.0.attn_output.bias" in gguf.tensors,
        mlp_bias="blk.0.ffn_down.bias" in gguf.tensors, qk_norm="blk.0.attn_q_norm.weight" in gguf.tensors,
        sandwich_norm="blk.0.post_ffw_norm.weight" in gguf.tensors,
        activation=Activation.GELU_TANH if gemma else Activation.SILU,
        embed_scale=math.sqrt(hidden) if gemma else float(key("embedding_scale", 1.0)) if minicpm else 1.0,
        residual_scale=float(key("residual_scale", 1.0)) if minicpm else 1.0,
        logit_scale=1.0 / float(key("logit_scale", 1.0)) if minicpm else 1.0,
        attn_scale=attn_scale,
        name=str(meta.get("general.name", gguf.path.name)),
    )


def _unpermute(w: torch.Tensor, heads: int) -> torch.Tensor:
    """Undo llama.cpp's per-head interleaving of Q/K rows (rows: heads * head_dim)."""
    # llama.cpp wrote rows as reshape(heads, 2, half).swapaxes(1, 2); this is the inverse.
    rest = w.shape[1:]
    return w.reshape(heads, w.shape[0] // heads // 2, 2, *rest).transpose(1, 2).reshape(w.shape)


def canonical_name(name: str) -> str | None:
    if name in _TOP:
        return _TOP[name]
    match = _BLOCK.fullmatch(name)
    if not match or match.group(2) not in _BLOCK_NAMES:
        return None
    return f"layers.{match.group(1)}.{_BLOCK_NAMES[match.group(2)]}.{match.group(3)}"


def gguf_tensors(gguf: GGUFFile, cfg: ModelConfig) -> Iterator[tuple[str, torch.Tensor]]:
    permuted = cfg.family in _PERMUTED
    for name, info in gguf.tensors.items():
        target = canonical_name(name)
        if target is None:
            continue
        tensor = dequantize(gguf.raw(name), info.ggml_type, info.shape, name)
        if permuted and ".attn.q." in target:
            tensor = _unpermute(tensor, cfg.num_heads)
        elif permuted and ".attn.k." in target:
            tensor = _unpermute(tensor, cfg.num_kv_heads)
        yield target, tensor
