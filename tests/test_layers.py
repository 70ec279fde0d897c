"""Fast paths against their references: packed linear/embedding, dense attention vs an explicit
softmax, RoPE scaling vs transformers, MiniCPM scaling vs an equivalent Llama."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

import blockmem
from blockmem.attention.base import LayerSpec
from blockmem.attention.dense import DenseLayer
from blockmem.config import RopeConfig, RopeKind
from blockmem.model.layers import Embedding, Linear
from blockmem.model.rope import Rotary, inverse_frequencies
from test_exactness import forward_chunks, reference_logits


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
def test_packed_linear_matches_plain(dtype, tol) -> None:
    torch.manual_seed(0)
    plain, packed = Linear(96, 200, bias=True), Linear(96, 200, bias=True)
    with torch.no_grad():
        plain.weight.copy_(torch.randn(200, 96) * 0.1)
        plain.bias.copy_(torch.randn(200))
        packed.weight.copy_(plain.weight)
        packed.bias.copy_(plain.bias)
    plain, packed = plain.to(dtype), packed.to(dtype)
    if not packed.pack():  # the plain path is then the only path
        pytest.skip(f"oneDNN cannot pack a {dtype} linear on this torch build and CPU")
    assert packed.weight is None
    for shape in ((1, 96), (3, 7, 96), (1, 1, 96)):
        x = torch.randn(shape).to(dtype)
        assert (packed(x).float() - plain(x).float()).abs().max() < tol


def test_a_weight_onednn_refuses_stays_plain(monkeypatch) -> None:
    """oneDNN refuses bfloat16 weights on CPUs without AVX-512: the layer keeps F.linear."""
    def refuse(weight: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("bf16 path needs the cpu support avx_ne_convert or avx512bw, avx512vl and avx512dq")

    monkeypatch.setattr("blockmem.model.layers._onednn_pack", refuse)
    layer = Linear(16, 8, bias=False)
    layer.weight.data = torch.randn(8, 16).bfloat16()
    assert layer.pack() is False and layer.packed is None and layer.weight is not None
    x = torch.randn(3, 16).bfloat16()
    assert torch.equal(layer(x), F.linear(x, layer.weight))


def test_packed_embedding_matches_plain() -> None:
    table = torch.randn(50, 16)
    plain, packed = Embedding(50, 16), Embedding(50, 16)
    plain.weight.data, packed.weight.data = table.clone(), table.clone()
    packed.pack()
    ids = torch.tensor([[3, 0, 49, 3]])
    assert torch.equal(packed(ids), plain(ids))
    x = torch.randn(2, 16)
    assert torch.allclose(packed.as_head(x), plain.as_head(x), atol=1e-5)


def naive_attention(q, k, v, scale, window):
    # q: [B, Hq, T, D], k/v: [B, Hkv, T, D], positions 0..T-1, explicit masked softmax
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    scores = (q @ k.transpose(-1, -2)) * scale
    pos = torch.arange(q.shape[2])
    allowed = (pos[None, :] <= pos[:, None]) & ((pos[:, None] - pos[None, :] < window) if window else True)
    return torch.softmax(scores.masked_fill(~allowed, -math.inf), -1) @ v


@pytest.mark.parametrize("window", [None, 5])
def test_dense_layer_matches_naive_attention(window) -> None:
    torch.manual_seed(0)
    spec = LayerSpec(0, num_heads=6, num_kv_heads=2, head_dim=8, scale=0.3, window=window)
    rotary = Rotary(RopeConfig(10000.0), 8)
    q, k, v = torch.randn(1, 6, 23, 8), torch.randn(1, 2, 23, 8), torch.randn(1, 2, 23, 8)
    expected = naive_attention(rotary.rotate(q, 0), rotary.rotate(k, 0), v, 0.3, window)
    for chunk in (23, 4, 1):
        layer = DenseLayer(spec, torch.device("cpu"), torch.float32)
        parts = [layer.attend(q[:, :, i:i + chunk], k[:, :, i:i + chunk], v[:, :, i:i + chunk], rotary, i)
                 for i in range(0, 23, chunk)]
        assert torch.allclose(torch.cat(parts, 2), expected, atol=1e-5)


def test_rotary_rotates_at_any_position_without_a_table_of_every_position() -> None:
    """Rotation equals the textbook formula (cos/sin in float64 of the float32 angles every
    float32 RoPE uses) from position 0 to far past any trained window, and what Rotary keeps
    stays a few recent slices, not one row per position (a table grown by doubling held ~1 KB
    per context token)."""
    torch.manual_seed(0)
    rope = RopeConfig(10000.0)
    rotary = Rotary(rope, 8)
    inv = inverse_frequencies(rope, 8)
    for start in (0, 1, 4093, 300_000, 2_000_000):
        x = torch.randn(2, 5, 8)
        angles = (torch.arange(start, start + 5, dtype=torch.float32)[:, None] * inv[None, :]).double()
        cos, sin = torch.cat([angles, angles], -1).cos(), torch.cat([angles, angles], -1).sin()
        half = torch.cat([-x[..., 4:], x[..., :4]], -1).double()
        expected = x.double() * cos + half * sin
        assert torch.allclose(rotary.rotate(x, start).double(), expected, atol=1e-5)
        assert torch.allclose(rotary.unrotate(rotary.rotate(x, start), start), x, atol=1e-5)
    for step in range(40):  # a long decode: one position per step
        rotary.rotate(torch.randn(1, 1, 8), 1_000_000 + step)
    held = sum(cos.numel() + sin.numel() for cos, sin in rotary._slices.values())
    assert held <= 16 * 5 * 8 * 2


def test_llama3_rope_matches_transformers() -> None:
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    params = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
              "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    hf = LlamaConfig(hidden_size=4096, num_attention_heads=32, max_position_embeddings=131072, rope_parameters=params)
    expected, _ = ROPE_INIT_FUNCTIONS["llama3"](hf, "cpu")
    ours = inverse_frequencies(RopeConfig(500000.0, RopeKind.LLAMA3, 8.0, 1.0, 4.0, 8192), 128)
    assert torch.allclose(ours, expected, rtol=1e-6)
    linear = inverse_frequencies(RopeConfig(10000.0, RopeKind.LINEAR, factor=4.0), 64)
    assert torch.allclose(linear * 4, inverse_frequencies(RopeConfig(10000.0), 64))


def test_minicpm_scaling_matches_equivalent_llama(tiny, tmp_path) -> None:
    """MiniCPM = Llama with embeddings x scale_emb, residual branches x scale_depth/sqrt(L) and
    logits x dim_model_base/hidden. Undoing those scales in the weights must give the Llama."""
    from safetensors.torch import save_file

    directory, ref = tiny.get("llama")
    config = json.loads((directory / "config.json").read_text())
    layers, hidden = config["num_hidden_layers"], config["hidden_size"]
    scale_emb, scale_depth, base = 12.0, 1.4, 16
    residual = scale_depth / math.sqrt(layers)
    state = {k: v.clone() for k, v in ref.state_dict().items()}
    state["model.embed_tokens.weight"] /= scale_emb
    state["lm_head.weight"] *= hidden / base
    for name in state:
        if name.endswith(("o_proj.weight", "down_proj.weight")):
            state[name] /= residual
    target = tmp_path / "minicpm"
    target.mkdir()
    save_file(state, str(target / "model.safetensors"))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (target / name).write_bytes((directory / name).read_bytes())
    config.update(model_type="minicpm", architectures=["MiniCPMForCausalLM"], scale_emb=scale_emb,
                  scale_depth=scale_depth, dim_model_base=base, rope_theta=10000.0)
    config.pop("rope_parameters", None)
    (target / "config.json").write_text(json.dumps(config))
    model = blockmem.load(target, device="cpu")
    assert model.config.family.value == "minicpm" and model.config.embed_scale == scale_emb
    ids = torch.randint(0, model.config.vocab_size, (1, 30), generator=torch.Generator().manual_seed(0))
    assert (forward_chunks(model, ids, 8) - reference_logits(ref, ids)).abs().max() < 1e-4


def test_bfloat16_runs_close_to_float32(tiny) -> None:
    directory, ref = tiny.get("qwen3")
    model = blockmem.load(directory, device="cpu", dtype="bfloat16")
    ids = torch.randint(0, model.config.vocab_size, (1, 20), generator=torch.Generator().manual_seed(0))
    expected = reference_logits(ref, ids)
    got = forward_chunks(model, ids, 20)
    assert got.dtype == torch.float32
    assert (got - expected).abs().max() < 0.1 * expected.abs().max()
    assert (got.argmax(-1) == expected.argmax(-1)).float().mean() > 0.8
