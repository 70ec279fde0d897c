"""GGUF files: every supported storage type, llama.cpp's tensor conventions per family, the
fast dequantizers and the header reader, each against an independent implementation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf import GGUFReader
from gguf.quants import quantize

import blockmem
from blockmem.model.dequant import dequantize, reference_decode
from blockmem.model.gguf_file import GGUFFile
from test_exactness import forward_chunks, reference_logits
from tiny import write_gguf

TYPES = [Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K,
         Q.IQ4_NL, Q.IQ4_XS]


def hf_tokenizer_ids(tiny, family: str, text: str) -> list[int]:
    return blockmem.load(tiny.get(family)[0], device="cpu").tokenizer.encode(text)


def _ids(model: blockmem.Model, length: int = 40) -> torch.Tensor:
    return torch.randint(0, model.config.vocab_size, (1, length), generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("ggml_type", TYPES, ids=lambda t: t.name)
def test_quantized_gguf_matches_transformers_gguf_loader(tiny, tmp_path, ggml_type: Q) -> None:
    """transformers dequantizes GGUF with its own torch code: an independent reference."""
    from transformers import AutoModelForCausalLM

    _, hf_model = tiny.get("llama", wide=True)
    path = tmp_path / f"tiny-{ggml_type.name}.gguf"
    write_gguf(hf_model, "llama", path, ggml_type)
    ref = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=path.name, dtype=torch.float32).eval()
    model = blockmem.load(path, device="cpu")
    ids = _ids(model)
    expected = reference_logits(ref, ids)
    assert (forward_chunks(model, ids, 16) - expected).abs().max().item() < 1e-4


# Not mistral: llama.cpp's `llama` architecture has no sliding window, so a Mistral GGUF cannot
# carry one (the HF-directory tests cover Mistral's window).
@pytest.mark.parametrize("family", ["llama", "llama3", "qwen2", "qwen3", "gemma3"])
def test_gguf_conventions_per_family(tiny, tmp_path, family: str) -> None:
    """Q/K permutation, (1 + w) Gemma norms, rope_freqs divisors, per-layer sliding pattern and
    attention scale: the GGUF must load to the same model as the HF directory it came from."""
    _, hf_model = tiny.get(family)
    path = tmp_path / f"{family}.gguf"
    write_gguf(hf_model, family, path, Q.F32)
    model = blockmem.load(path, device="cpu")
    assert model.config.family.value == ("llama" if family == "llama3" else family)
    assert model.tokenizer.encode("Paris is the capital") == hf_tokenizer_ids(tiny, family, "Paris is the capital")
    ids = _ids(model, 60)
    assert (forward_chunks(model, ids, 9) - reference_logits(hf_model, ids)).abs().max().item() < 1e-4


@pytest.mark.parametrize("ggml_type", [Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.F16, Q.BF16],
                         ids=lambda t: t.name)
def test_fast_dequant_is_bit_exact(ggml_type: Q) -> None:
    values = np.random.default_rng(0).standard_normal((70, 96)).astype(np.float32) * 3
    raw = quantize(values, ggml_type).reshape(-1).view(np.uint8)
    fast = dequantize(raw, ggml_type, values.shape)
    assert torch.equal(fast, reference_decode(raw, ggml_type, values.shape))
    assert (fast - torch.from_numpy(values)).abs().max() < 2.0  # and it decodes the values, roughly


def test_reader_agrees_with_gguf_package(tiny, tmp_path) -> None:
    _, hf_model = tiny.get("qwen3")
    path = tmp_path / "q.gguf"
    write_gguf(hf_model, "qwen3", path, Q.Q8_0)
    ours, theirs = GGUFFile(path), GGUFReader(path)
    for key, field in theirs.fields.items():
        if key.startswith("GGUF."):
            continue
        assert ours.metadata[key] == field.contents(), key
    assert set(ours.tensors) == {t.name for t in theirs.tensors}
    for tensor in theirs.tensors:
        info = ours.tensors[tensor.name]
        assert info.ggml_type == tensor.tensor_type
        assert np.array_equal(ours.raw(tensor.name), np.asarray(tensor.data).reshape(-1).view(np.uint8))
