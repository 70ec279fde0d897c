"""Our decoder against transformers' own model classes on the same random weights: logits
within 1e-4 (fp32) for one-shot, chunked and token-by-token runs, and identical greedy output."""

from __future__ import annotations

import pytest
import torch

import blockmem
from blockmem.model.decoder import Logits
from conftest import FAMILIES

LENGTHS = (1, 5, 37, 120)  # past the tiny sliding windows (8 and 16 tokens)


def forward_chunks(model: blockmem.Model, ids: torch.Tensor, chunk: int) -> torch.Tensor:
    """Logits for every position, feeding `chunk` tokens at a time through one cache."""
    cache = blockmem.Engine(model).new_cache()
    with torch.inference_mode():
        parts = [model.decoder(ids[:, i:i + chunk], cache, Logits.ALL) for i in range(0, ids.shape[1], chunk)]
    assert cache.length == ids.shape[1]
    return torch.cat(parts, dim=1)


def reference_logits(ref: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return ref(ids).logits.float()


@pytest.mark.parametrize("pack", [False, True], ids=["plain", "packed"])
@pytest.mark.parametrize("family", FAMILIES)
def test_logits_match_transformers(tiny, family: str, pack: bool) -> None:
    directory, ref = tiny.get(family)
    model = blockmem.load(directory, device="cpu", pack=pack)
    generator = torch.Generator().manual_seed(1)
    for length in LENGTHS:
        ids = torch.randint(0, model.config.vocab_size, (1, length), generator=generator)
        expected = reference_logits(ref, ids)
        assert expected.abs().max() > 1.0  # logits far from zero, so the comparison means something
        for chunk in (length, 7, 1):  # one shot, chunked prefill, token by token
            got = forward_chunks(model, ids, chunk)
            assert (got - expected).abs().max().item() < 1e-4, (family, length, chunk)


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_generation_matches_transformers(tiny, family: str) -> None:
    directory, ref = tiny.get(family)
    model = blockmem.load(directory, device="cpu")
    prompt = model.tokenizer.encode("The quick brown fox jumps over the lazy dog.")
    with torch.inference_mode():
        out = ref.generate(torch.tensor([prompt]), max_new_tokens=64, do_sample=False, eos_token_id=None,
                           pad_token_id=0)
    expected = out[0, len(prompt):].tolist()
    completion = blockmem.Engine(model, prefill_chunk=4).generate(
        prompt_ids=prompt, max_new_tokens=64, ignore_eos=True)
    assert len(expected) == 64
    assert completion.token_ids == expected


def test_sharded_safetensors_directory(tiny, tmp_path) -> None:
    from blockmem.errors import ModelError

    directory, ref = tiny.get("qwen2")
    sharded = tmp_path / "sharded"
    ref.save_pretrained(sharded, max_shard_size="40KB")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (sharded / name).write_bytes((directory / name).read_bytes())
    shards = sorted(sharded.glob("*.safetensors"))
    assert len(shards) > 3 and (sharded / "model.safetensors.index.json").exists()
    model = blockmem.load(sharded, device="cpu")
    ids = torch.randint(0, model.config.vocab_size, (1, 30), generator=torch.Generator().manual_seed(2))
    assert (forward_chunks(model, ids, 30) - reference_logits(ref, ids)).abs().max().item() < 1e-4
    shards[1].unlink()
    with pytest.raises(ModelError, match=f"weight shard .*{shards[1].name} is missing"):
        blockmem.load(sharded, device="cpu")
