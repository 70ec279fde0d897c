"""The packaged real models (slow: they load real weights and a transformers reference).

Logits are compared with transformers loading the same GGUF file (it needs `accelerate`)."""

from __future__ import annotations

import shutil
import subprocess

import pytest
import torch

import blockmem
from test_exactness import forward_chunks

pytestmark = pytest.mark.slow

PROSE = ("The river winds through the valley, past farms and old stone bridges. In spring the water rises "
         "and the fields turn green; in autumn the leaves fall and drift downstream. ")


@pytest.mark.parametrize("name,repeats", [("smollm2-135m", 12), ("gemma3-270m", 40)])
def test_logits_match_transformers_on_same_gguf(name: str, repeats: int) -> None:
    from transformers import AutoModelForCausalLM

    model = blockmem.load(name, device="cpu")
    ids = torch.tensor([model.tokenizer.encode(PROSE * repeats)])
    if name == "gemma3-270m":
        assert ids.shape[1] > 2 * model.config.layer_windows[0]  # past the 512-token sliding window
    ref = AutoModelForCausalLM.from_pretrained(str(model.path.parent), gguf_file=model.path.name,
                                               dtype=torch.float32).eval()
    with torch.inference_mode():
        expected = ref(ids).logits.float()
    del ref
    got = forward_chunks(model, ids, 256)  # chunked prefill through the packed fast path
    diff = (got - expected).abs()
    # fp32 reordering only: one-shot through the plain path is bit-identical to transformers;
    # chunking and oneDNN packing reorder sums, by how much depends on the CPU's kernels (measured
    # on Gemma: max 2.3e-3, mean 1.2e-5 on an AVX-512 EPYC; max 5.4e-3 on an AVX2-only one).
    assert diff.max().item() < 1e-2 and diff.mean().item() < 1e-4
    assert torch.equal(got.argmax(-1), expected.argmax(-1))


def test_default_model_answers_paris() -> None:
    exe = shutil.which("blockmem")
    assert exe, "the blockmem console script is not installed"
    result = subprocess.run([exe, "run", "What is the capital of France?", "--threads", "1"], capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert "Paris" in result.stdout
    assert "decode" in result.stderr and "peak RSS" in result.stderr


@pytest.mark.parametrize("name", ["streaming", "infllm", "blocksparse", "nosa", "quest"])
def test_smollm2_sparse_with_full_budget_equals_dense(smollm2, name: str) -> None:
    """A few thousand tokens, chunked prefill and decode: blocks leave the window, and with a
    budget covering every block each method must give dense's logits."""
    from blockmem.attention import create_method
    from test_sparse import run

    ids = torch.tensor([smollm2.tokenizer.encode(PROSE * 30)])[:, :2600]
    options = dict(n_init=64, n_local=512, block_size=64, exec_size=256)
    options.update(n_local=4096) if name == "streaming" else options.update(topk=1000, position="true")
    dense = run(smollm2, "dense", ids, chunk=1024, decode=4)
    sparse = run(smollm2, create_method(name, **options), ids, chunk=1024, decode=4)
    assert (sparse - dense).abs().max().item() < 1e-4


def test_smollm2_infllm_finds_a_passkey_past_its_window(smollm2) -> None:
    from blockmem.attention import create_method
    from blockmem.eval.passkey import make_trial

    trial = make_trial(smollm2.tokenizer, 12 * 1024, 0, seed=1)
    assert trial.tokens > smollm2.config.max_context
    out = blockmem.Engine(smollm2, method=create_method("infllm")).generate(trial.prompt, raw=True, max_new_tokens=8)
    assert trial.score(out.text), (out.text, trial.key)
