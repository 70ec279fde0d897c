"""The model's shape and switches as one frozen, validated dataclass.

Loaders (`model/hf.py`, `model/gguf.py`) translate their sources into a `ModelConfig`; the model
code reads only this, so a new checkpoint format never touches the model file.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field

from blockmem.errors import ConfigError


class Family(enum.Enum):
    """Architectures the decoder implements (all are Llama-family variants)."""

    LLAMA = "llama"
    MISTRAL = "mistral"
    QWEN2 = "qwen2"
    QWEN3 = "qwen3"
    MINICPM = "minicpm"
    GEMMA3 = "gemma3"


class Activation(enum.Enum):
    SILU = "silu"  # SwiGLU
    GELU_TANH = "gelu_tanh"  # GeGLU (Gemma)


class RopeKind(enum.Enum):
    DEFAULT = "default"
    LINEAR = "linear"  # positions divided by `factor`
    LLAMA3 = "llama3"  # Llama 3.1 frequency-dependent scaling


@dataclass(frozen=True)
class RopeConfig:
    """One rotary-embedding setting. `freq_divisors` (from a GGUF `rope_freqs` tensor) divides
    the base inverse frequencies; it is how llama.cpp files carry Llama 3.1 scaling."""

    theta: float
    kind: RopeKind = RopeKind.DEFAULT
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position: int = 8192
    freq_divisors: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        if not (self.theta > 0 and math.isfinite(self.theta)):
            raise ConfigError(f"RoPE base must be a positive number, got {self.theta}")
        if self.factor <= 0:
            raise ConfigError(f"RoPE scaling factor must be positive, got {self.factor}")


@dataclass(frozen=True)
class ModelConfig:
    family: Family
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_context: int
    rms_norm_eps: float
    rope: RopeConfig
    # Sliding-window layers (Gemma 3 local layers, Mistral) may use their own RoPE base.
    local_rope: RopeConfig | None = None
    # Per layer: None for full attention, else the window W (query i sees keys j with i - j < W).
    layer_windows: tuple[int | None, ...] = ()
    tie_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False  # RMSNorm over head_dim on q and k before RoPE (Qwen3, Gemma 3)
    sandwich_norm: bool = False  # extra norms after attention and MLP (Gemma 3)
    activation: Activation = Activation.SILU
    embed_scale: float = 1.0  # Gemma: sqrt(hidden); MiniCPM: scale_emb
    residual_scale: float = 1.0  # MiniCPM: scale_depth / sqrt(num_layers)
    logit_scale: float = 1.0  # MiniCPM: dim_model_base / hidden
    attn_scale: float = 0.0  # 0 means head_dim ** -0.5
    final_logit_softcap: float | None = None
    name: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        positive = ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                    "num_kv_heads", "head_dim", "max_context")
        for key in positive:
            value = getattr(self, key)
            if not isinstance(value, int) or value <= 0:
                raise ConfigError(f"model config: {key} must be a positive integer, got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(f"model config: {self.num_heads} attention heads cannot be shared "
                              f"evenly by {self.num_kv_heads} key/value heads")
        if self.head_dim % 2:
            raise ConfigError(f"model config: head_dim must be even for RoPE, got {self.head_dim}")
        if not self.layer_windows:
            object.__setattr__(self, "layer_windows", (None,) * self.num_layers)
        if len(self.layer_windows) != self.num_layers:
            raise ConfigError(f"model config: {len(self.layer_windows)} layer windows given "
                              f"for {self.num_layers} layers")
        if any(w is not None and w <= 0 for w in self.layer_windows):
            raise ConfigError("model config: sliding windows must be positive")
        if self.attn_scale == 0.0:
            object.__setattr__(self, "attn_scale", self.head_dim ** -0.5)

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def rope_for_layer(self, layer: int) -> RopeConfig:
        if self.layer_windows[layer] is not None and self.local_rope is not None:
            return self.local_rope
        return self.rope

    def kv_bytes_per_token(self, bytes_per_element: int = 4) -> int:
        """Bytes one token's keys and values take in a dense cache over all layers."""
        return 2 * self.num_layers * self.kv_size * bytes_per_element
