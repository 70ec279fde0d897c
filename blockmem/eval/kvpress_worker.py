"""The kvpress peer, run as a script by a Python that has kvpress (it imports nothing from blockmem).

kvpress 0.5.5 needs transformers < 5.3 while blockmem's tests use a newer one, so the peer can live
in its own environment (docs/eval.md#peers):

    python3 -m venv ~/.venvs/kvpress && ~/.venvs/kvpress/bin/pip install torch==2.13.0 kvpress accelerate gguf
    blockmem eval --peers kvpress --kvpress-python ~/.venvs/kvpress/bin/python ...

Protocol (JSON lines): the first line on stdin is the setup {"model": path (a .gguf file or an HF
directory), "press": name, "ratio": compression ratio, "threads": n}; then one request per line
{"context": [ids], "question": [ids], "max_new_tokens": n, "eos": [ids]}, each answered on stdout by
{"tokens": [ids], "prefill_seconds", "ttft", "decode_seconds", "kept": KV tokens kept per layer
after compression, "peak_rss_bytes"}. As in kvpress's own pipeline, the press compresses the
context during its prefill; the question and the answer are then decoded greedily on top.
"""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path

PRESSES = {"streaming": "StreamingLLMPress", "snapkv": "SnapKVPress", "knorm": "KnormPress",
           "expected_attention": "ExpectedAttentionPress", "tova": "TOVAPress", "random": "RandomPress"}


def main() -> None:
    import torch
    import kvpress
    import transformers
    from transformers import AutoModelForCausalLM, DynamicCache

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()

    setup = json.loads(sys.stdin.readline())
    torch.set_num_threads(int(setup.get("threads") or torch.get_num_threads()))
    path = Path(setup["model"])
    kwargs = {"gguf_file": path.name} if path.is_file() else {}
    model = AutoModelForCausalLM.from_pretrained(str(path.parent if path.is_file() else path), dtype=torch.float32,
                                                 attn_implementation="sdpa", **kwargs).eval()
    press = getattr(kvpress, PRESSES[setup["press"]])(compression_ratio=float(setup["ratio"]))
    print(json.dumps({"ready": True, "kvpress": getattr(kvpress, "__version__", "?")}), flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        context = torch.tensor([request["context"]])
        question = torch.tensor([request["question"]])
        eos = set(request["eos"])
        with torch.inference_mode():
            cache = DynamicCache()
            started = time.perf_counter()
            with press(model):
                model.model(input_ids=context, past_key_values=cache)
            prefill = time.perf_counter() - started
            kept = cache.get_seq_length()
            positions = torch.arange(context.shape[1], context.shape[1] + question.shape[1]).unsqueeze(0)
            logits = model(input_ids=question, past_key_values=cache, position_ids=positions, logits_to_keep=1).logits
            tokens = [int(logits[0, -1].argmax())]
            ttft = time.perf_counter() - started
            position = positions[:, -1:] + 1
            while tokens[-1] not in eos and len(tokens) < request["max_new_tokens"]:
                logits = model(input_ids=torch.tensor([[tokens[-1]]]), past_key_values=cache,
                               position_ids=position).logits
                tokens.append(int(logits[0, -1].argmax()))
                position = position + 1
            decode = time.perf_counter() - started - ttft
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
        print(json.dumps({"tokens": tokens, "prefill_seconds": prefill, "ttft": ttft, "decode_seconds": decode,
                          "kept": kept, "peak_rss_bytes": peak}), flush=True)


if __name__ == "__main__":
    main()
