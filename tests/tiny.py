"""Tiny random models for tests: transformers builds them (the independent reference), saves
them as HF directories, and `write_gguf` re-encodes one as a GGUF file in llama.cpp's
conventions (permuted Q/K for llama, +1 Gemma norms, byte-level BPE vocabulary)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CORPUS = ["The quick brown fox jumps over the lazy dog.", "Paris is the capital of France.",
          "A passkey is hidden in the haystack: 12345.", "def f(x):\n    return x * 2\n",
          "Numbers 0 1 2 3 4 5 6 7 8 9 and letters a b c d e f g.", "café naïve 日本 😀"] * 20


def build_tokenizer() -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    return tok


def hf_config(family: str, vocab: int, wide: bool = False):
    """`wide` makes rows 256 long, as K-quant GGUF types require."""
    import transformers as tf

    hidden, inter = (256, 512) if wide else (64, 96)
    common = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  initializer_range=2.0 / hidden ** 0.5, eos_token_id=2, bos_token_id=1)
    if family == "llama":
        return tf.LlamaConfig(**common, rope_theta=10000.0)
    if family == "llama3":  # Llama 3.1 RoPE scaling, tied embeddings, attention bias
        return tf.LlamaConfig(**{**common, "max_position_embeddings": 512}, tie_word_embeddings=True,
                              attention_bias=True, rope_parameters={"rope_type": "llama3", "rope_theta": 50000.0,
                              "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                              "original_max_position_embeddings": 64})
    if family == "mistral":
        return tf.MistralConfig(**common, sliding_window=16, head_dim=16)
    if family == "qwen2":
        return tf.Qwen2Config(**common)
    if family == "qwen3":
        return tf.Qwen3Config(**common, head_dim=32)
    if family == "gemma3":
        return tf.Gemma3TextConfig(**{**common, "num_hidden_layers": 4}, head_dim=16, query_pre_attn_scalar=24,
                                   sliding_window=8, layer_types=["sliding_attention", "sliding_attention",
                                   "full_attention", "sliding_attention"], rope_parameters={
                                       "full_attention": {"rope_type": "default", "rope_theta": 1e6},
                                       "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}})
    raise ValueError(family)


def build_hf_model(family: str, directory: Path, seed: int = 0, wide: bool = False):
    """Save a random `family` model with tokenizer and chat template to `directory`; return it."""
    import transformers as tf

    tok = build_tokenizer()
    torch.manual_seed(seed)
    config = hf_config(family, tok.get_vocab_size(), wide)
    cls = tf.Gemma3ForCausalLM if family == "gemma3" else tf.AutoModelForCausalLM
    model = cls.from_config(config).float().eval() if cls is tf.AutoModelForCausalLM else cls(config).float().eval()
    with torch.no_grad():  # Gemma zero-initialises its norms; give them some weight to test
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.3)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps(
        {"chat_template": CHATML, "eos_token": "<|im_end|>", "bos_token": "<|im_start|>"}))
    return model


# ---- GGUF -------------------------------------------------------------------------------------

_GGUF_ARCH = {"llama": "llama", "llama3": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3",
              "gemma3": "gemma3"}
_NAMES = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
          "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm",
          "self_attn.k_norm": "attn_k_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
          "mlp.down_proj": "ffn_down", "pre_feedforward_layernorm": "ffn_norm",
          "post_feedforward_layernorm": "post_ffw_norm"}


def _gguf_name(name: str, gemma: bool) -> str:
    top = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
           "lm_head.weight": "output.weight"}
    if name in top:
        return top[name]
    _, _, index, rest = name.split(".", 3)
    module, kind = rest.rsplit(".", 1)
    if module == "post_attention_layernorm":
        module = "post_attention_norm" if gemma else "ffn_norm"
    else:
        module = _NAMES[module]
    return f"blk.{index}.{module}.{kind}"


def _permute(w: np.ndarray, heads: int) -> np.ndarray:
    # llama.cpp's convert_hf_to_gguf: rows regrouped for interleaved RoPE
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _random_k_blocks(ggml_type, rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    """Random K/IQ-quant bytes with small, finite fp16 scales (gguf cannot quantize these types)."""
    from gguf import GGML_QUANT_SIZES
    from gguf import GGMLQuantizationType as Q

    block, size = GGML_QUANT_SIZES[ggml_type]
    raw = rng.integers(0, 256, size=(rows * cols // block, size), dtype=np.uint8)
    # fp16 super-block scales chosen so decoded weights are ~0.1, like a real layer's
    offsets, value = {Q.Q4_K: ((0, 2), 5e-4), Q.Q5_K: ((0, 2), 2.5e-4), Q.Q6_K: ((208,), 1e-4),
                      Q.Q2_K: ((80, 82), 3e-3), Q.Q3_K: ((108,), 1e-3), Q.IQ4_NL: ((0,), 1e-3),
                      Q.IQ4_XS: ((0,), 3e-5)}[ggml_type]
    scale = np.frombuffer(np.float16(value).tobytes(), dtype=np.uint8)
    for offset in offsets:
        raw[:, offset:offset + 2] = scale
    return raw.reshape(rows, -1)


def write_gguf(model, family: str, path: Path, ggml_type=None, tokenizer: Tokenizer | None = None,
               seed: int = 0) -> dict[str, torch.Tensor]:
    """Write `model` as GGUF with 2-D weights stored as `ggml_type` (default F32).

    Returns the weights as the file now holds them, dequantized, under HF names, so a reference
    model can be given exactly the file's values (K types are random bytes, not the model's).
    """
    import gguf
    from gguf import GGMLQuantizationType as Q
    from gguf.quants import dequantize, quantize

    ggml_type = ggml_type or Q.F32
    cfg, arch, gemma = model.config, _GGUF_ARCH[family], family == "gemma3"
    tok = tokenizer or build_tokenizer()
    rng = np.random.default_rng(seed)
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name(f"tiny {family}")
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    rope = cfg.rope_parameters.get("full_attention", cfg.rope_parameters)
    writer.add_rope_freq_base(rope["rope_theta"])
    if gemma:
        writer.add_attention_scale(cfg.query_pre_attn_scalar ** -0.5)
        writer.add_sliding_window(cfg.sliding_window)
        writer.add_sliding_window_pattern([t == "sliding_attention" for t in cfg.layer_types])
    vocab = [t for t, _ in sorted(tok.get_vocab().items(), key=lambda kv: kv[1])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(vocab)
    writer.add_token_types([3 if t in SPECIALS else 1 for t in vocab])
    merges = json.loads(tok.to_str())["model"]["merges"]
    writer.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in merges])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_add_bos_token(False)
    writer.add_chat_template(CHATML)
    if rope.get("rope_type") == "llama3":  # llama.cpp carries Llama 3.1 scaling as divisors
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](cfg, "cpu")
        base = 1.0 / (rope["rope_theta"] ** (torch.arange(0, head_dim, 2).float() / head_dim))
        writer.add_tensor("rope_freqs.weight", (base / scaled).numpy().astype(np.float32))
    held: dict[str, torch.Tensor] = {}
    for name, tensor in model.state_dict().items():
        if "rotary" in name or (name == "lm_head.weight" and cfg.tie_word_embeddings):
            continue
        data = tensor.float().numpy().copy()
        if gemma and name.endswith("norm.weight"):
            data = data + 1.0  # llama.cpp stores Gemma norms as (1 + w)
        target = _gguf_name(name, gemma)
        if arch == "llama" and ".attn_q." in target:
            data = _permute(data, cfg.num_attention_heads)
        elif arch == "llama" and ".attn_k." in target:
            data = _permute(data, cfg.num_key_value_heads)
        store = ggml_type if data.ndim == 2 else Q.F32
        if store in (Q.Q4_K, Q.Q5_K, Q.Q6_K, Q.Q2_K, Q.Q3_K, Q.IQ4_NL, Q.IQ4_XS):
            raw = _random_k_blocks(store, *data.shape, rng)
        elif store == Q.F32:
            raw = data
        else:
            raw = quantize(data, store)
        if store == Q.F32:
            writer.add_tensor(target, raw)
        else:  # the writer derives the logical shape from the byte shape
            writer.add_tensor(target, raw, raw_dtype=store)
        stored = dequantize(raw, store).reshape(data.shape) if store != Q.F32 else data
        if arch == "llama" and (".attn_q." in target or ".attn_k." in target):
            heads = cfg.num_attention_heads if ".attn_q." in target else cfg.num_key_value_heads
            stored = stored.reshape(heads, stored.shape[0] // heads // 2, 2, -1).swapaxes(1, 2).reshape(data.shape)
        if gemma and name.endswith("norm.weight"):
            stored = stored - 1.0
        held[name] = torch.from_numpy(np.ascontiguousarray(stored, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return held
