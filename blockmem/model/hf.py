"""Hugging Face model directories: config.json -> ModelConfig, *.safetensors -> named tensors.

Tensors come out under the decoder's own names with q/k/v and gate/up still separate (the
"canonical" names `weights.fuse` expects). Safetensors are memory-mapped: a tensor is read
from disk only when it is converted.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from blockmem.config import Activation, Family, ModelConfig, RopeConfig, RopeKind
from blockmem.errors import ModelError

_FAMILIES = {"llama": Family.LLAMA, "mistral": Family.MISTRAL, "qwen2": Family.QWEN2, "qwen3": Family.QWEN3,
             "minicpm": Family.MINICPM, "gemma3_text": Family.GEMMA3}
_ACTIVATIONS = {"silu": Activation.SILU, "swish": Activation.SILU, "gelu_pytorch_tanh": Activation.GELU_TANH,
                "gelu_tanh": Activation.GELU_TANH}
SUPPORTED = "Llama 2/3/3.1, Mistral, Qwen2/2.5, Qwen3, SmolLM2, MiniCPM, Gemma 3 (text)"


def read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelError(f"{path} is missing", "a Hugging Face model directory needs config.json, "
                         "*.safetensors and tokenizer.json") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelError(f"{path} is not valid JSON ({exc})", "download the file again") from None


def family_of(config: dict[str, Any], source: str) -> Family:
    model_type = config.get("model_type", "")
    if model_type == "gemma3" and "text_config" in config:
        raise ModelError(f"{source} is a multimodal Gemma 3 checkpoint; blockmem runs text-only Gemma 3 models "
                         "(270M, 1B)")
    try:
        return _FAMILIES[model_type]
    except KeyError:
        archs = ", ".join(config.get("architectures") or []) or "unknown"
        raise ModelError(f"{source}: unsupported architecture {model_type or '?'} ({archs})",
                         f"blockmem supports {SUPPORTED}") from None


def _rope(params: dict[str, Any] | None, theta: float, source: str) -> RopeConfig:
    params = dict(params or {})
    kind = params.get("rope_type", params.get("type", "default"))
    theta = float(params.get("rope_theta", theta))
    if kind == "default":
        return RopeConfig(theta)
    if kind == "linear":
        return RopeConfig(theta, RopeKind.LINEAR, factor=float(params["factor"]))
    if kind == "llama3":
        return RopeConfig(theta, RopeKind.LLAMA3, factor=float(params["factor"]),
                          low_freq_factor=float(params["low_freq_factor"]),
                          high_freq_factor=float(params["high_freq_factor"]),
                          original_max_position=int(params["original_max_position_embeddings"]))
    raise ModelError(f"{source}: RoPE scaling {kind!r} is not supported", "supported: default, linear, llama3")


def _ropes(config: dict[str, Any], family: Family, source: str) -> tuple[RopeConfig, RopeConfig | None]:
    """The rope of full-attention layers and, for Gemma 3, of its sliding layers."""
    params = config.get("rope_parameters")
    theta = float(config.get("rope_theta", 10000.0))
    if isinstance(params, dict) and "full_attention" in params:  # transformers 5, per layer type
        local = params.get("sliding_attention")
        return _rope(params["full_attention"], theta, source), _rope(local, theta, source) if local else None
    rope = _rope(params if params is not None else config.get("rope_scaling"), theta, source)
    if family is Family.GEMMA3:
        return rope, RopeConfig(float(config.get("rope_local_base_freq", 10000.0)))
    return rope, None


def _windows(config: dict[str, Any], family: Family, layers: int) -> tuple[int | None, ...]:
    window = config.get("sliding_window")
    types = config.get("layer_types")
    if types:
        return tuple(window if kind == "sliding_attention" else None for kind in types)
    if family is Family.GEMMA3:
        pattern = int(config.get("sliding_window_pattern", 6))
        return tuple(None if (i + 1) % pattern == 0 else window for i in range(layers))
    if family is Family.QWEN2:
        if not config.get("use_sliding_window"):
            return (None,) * layers
        first = int(config.get("max_window_layers", layers))
        return tuple(window if i >= first else None for i in range(layers))
    if family is Family.MISTRAL and window:
        return (int(window),) * layers
    return (None,) * layers


def config_from_hf(config: dict[str, Any], source: str) -> ModelConfig:
    family = family_of(config, source)
    act_name = config.get("hidden_activation") or config.get("hidden_act", "silu")
    if act_name not in _ACTIVATIONS:
        raise ModelError(f"{source}: activation {act_name!r} is not supported", "supported: silu, gelu_pytorch_tanh")
    if config.get("attn_logit_softcapping") or config.get("use_bidirectional_attention"):
        raise ModelError(f"{source}: attention logit soft-capping and bidirectional attention are not supported")
    hidden, heads, layers = config["hidden_size"], config["num_attention_heads"], config["num_hidden_layers"]
    head_dim = config.get("head_dim") or hidden // heads
    rope, local_rope = _ropes(config, family, source)
    gemma, minicpm = family is Family.GEMMA3, family is Family.MINICPM
    bias = bool(config.get("attention_bias", False))
    return ModelConfig(
        family=family, vocab_size=config["vocab_size"], hidden_size=hidden,
        intermediate_size=config["intermediate_size"], num_layers=layers, num_heads=heads,
        num_kv_heads=config.get("num_key_value_heads") or heads, head_dim=head_dim,
        max_context=int(config.get("max_position_embeddings", 4096)),
        rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)), rope=rope, local_rope=local_rope,
        layer_windows=_windows(config, family, layers),
        tie_embeddings=bool(config.get("tie_word_embeddings", gemma)),
        qkv_bias=bias or family is Family.QWEN2, o_bias=bias, mlp_bias=bool(config.get("mlp_bias", False)),
        qk_norm=family in (Family.QWEN3, Family.GEMMA3), sandwich_norm=gemma, activation=_ACTIVATIONS[act_name],
        embed_scale=math.sqrt(hidden) if gemma else float(config.get("scale_emb", 1.0)) if minicpm else 1.0,
        residual_scale=config["scale_depth"] / math.sqrt(layers) if minicpm else 1.0,
        logit_scale=config["dim_model_base"] / hidden if minicpm else 1.0,
        attn_scale=config.get("query_pre_attn_scalar", head_dim) ** -0.5 if gemma else 0.0,
        final_logit_softcap=config.get("final_logit_softcapping"),
        name=config.get("_name_or_path", "") or source,
    )


_LAYER = re.compile(r"model\.layers\.(\d+)\.(.+)")
_LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_norm.weight": "attn.q_norm.weight", "self_attn.k_norm.weight": "attn.k_norm.weight",
    "mlp.gate_proj.weight": "mlp.gate.weight", "mlp.up_proj.weight": "mlp.up.weight",
    "mlp.down_proj.weight": "mlp.down.weight", "mlp.gate_proj.bias": "mlp.gate.bias",
    "mlp.up_proj.bias": "mlp.up.bias", "mlp.down_proj.bias": "mlp.down.bias",
    "pre_feedforward_layernorm.weight": "mlp_norm.weight",
    "post_feedforward_layernorm.weight": "post_mlp_norm.weight",
}
for _p in "qkvo":
    _LAYER_NAMES[f"self_attn.{_p}_proj.weight"] = f"attn.{_p}.weight"
    _LAYER_NAMES[f"self_attn.{_p}_proj.bias"] = f"attn.{_p}.bias"
_TOP_NAMES = {"model.embed_tokens.weight": "embed.weight", "model.norm.weight": "norm.weight",
              "lm_head.weight": "head.weight"}


def canonical_name(name: str, family: Family) -> str | None:
    """The decoder's name for an HF tensor name (None: not a weight we use, e.g. old inv_freq)."""
    if name in _TOP_NAMES:
        return _TOP_NAMES[name]
    match = _LAYER.fullmatch(name)
    if not match:
        return None
    index, rest = match.groups()
    if rest == "post_attention_layernorm.weight":  # Gemma: after attention; others: before the MLP
        rest_new = "post_attn_norm.weight" if family is Family.GEMMA3 else "mlp_norm.weight"
    else:
        rest_new = _LAYER_NAMES.get(rest)
    return f"layers.{index}.{rest_new}" if rest_new else None


def safetensor_files(directory: Path) -> list[Path]:
    index = directory / "model.safetensors.index.json"
    if index.exists():
        shards = sorted(set(read_json(index).get("weight_map", {}).values()))
        files = [directory / shard for shard in shards]
    else:
        files = sorted(directory.glob("*.safetensors"))
    if not files:
        hint = "convert .bin weights to safetensors" if list(directory.glob("*.bin")) else "download the weights"
        raise ModelError(f"{directory} has no *.safetensors weights", hint)
    for path in files:
        if not path.is_file():
            raise ModelError(f"weight shard {path} is missing", "download the model again")
    return files


def hf_tensors(directory: Path, cfg: ModelConfig) -> Iterator[tuple[str, torch.Tensor]]:
    """(canonical name, tensor) for every weight, Gemma norms shifted to their effective (1 + w)."""
    for path in safetensor_files(directory):
        try:
            with safe_open(str(path), framework="pt") as handle:
                for name in handle.keys():
                    target = canonical_name(name, cfg.family)
                    if target is None:
                        continue
                    tensor = handle.get_tensor(name)
                    if cfg.family is Family.GEMMA3 and target.endswith("norm.weight"):
                        tensor = tensor.float() + 1.0
                    yield target, tensor
        except SafetensorError as exc:
            raise ModelError(f"{path} is not a valid safetensors file ({exc})", "download it again") from None
