"""Load a model by catalog name, GGUF file or Hugging Face directory into a ready `Model`."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from blockmem.config import ModelConfig
from blockmem.heap import trim_heap
from blockmem.errors import ConfigError, ModelError
from blockmem.model import int4
from blockmem.model.catalog import CATALOG, DEFAULT_MODEL
from blockmem.model.decoder import Decoder
from blockmem.model.gguf import config_from_gguf, gguf_tensors
from blockmem.model.gguf_file import GGUFFile
from blockmem.model.hf import config_from_hf, hf_tensors, read_json
from blockmem.model.tokenizer import Tokenizer, tokenizer_from_gguf, tokenizer_from_hf
from blockmem.model.weights import build_model

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


@dataclass
class Model:
    """A loaded model: the decoder, its tokenizer and config, and where it came from."""

    decoder: Decoder
    tokenizer: Tokenizer
    config: ModelConfig
    name: str
    path: Path
    load_seconds: float
    quant: str | None = None  # "int4": 4-bit weights serve decode steps (compute in decoder.dtype)

    @property
    def precision(self) -> str:
        """What `load(dtype=...)` was given, normalised: float32, bfloat16, float16 or int4."""
        return self.quant or str(self.decoder.dtype).removeprefix("torch.")

    @property
    def has_chat_template(self) -> bool:
        return bool(self.tokenizer.chat_template)


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return DTYPES[dtype.lower()]
    except KeyError:
        raise ConfigError(f"unknown dtype {dtype!r}", "use float32, bfloat16 or float16") from None


def parse_precision(dtype: str | torch.dtype) -> tuple[torch.dtype, str | None]:
    """A model precision: a torch dtype, or `int4` (4-bit weights for decode, bfloat16 compute)."""
    if isinstance(dtype, str) and dtype.lower() == "int4":
        return torch.bfloat16, "int4"
    try:
        return parse_dtype(dtype), None
    except ConfigError:
        raise ConfigError(f"unknown dtype {dtype!r}", "use float32, bfloat16, float16 or int4") from None


def parse_device(device: str | torch.device) -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise ConfigError(f"unknown device {device!r}", "use auto, cpu, cuda or cuda:N") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {device} requested but this torch build sees no CUDA GPU",
                          "use --device cpu, or install a CUDA build of torch (see README)")
    return resolved


def resolve(model: str | Path | None) -> tuple[str, Path]:
    """(display name, path) for a catalog name, a .gguf file or an HF directory."""
    if model is None:
        model = DEFAULT_MODEL
    text = str(model)
    if text in CATALOG:
        return text, CATALOG[text].locate()
    path = Path(text).expanduser()
    if path.exists():
        return path.name, path
    names = ", ".join(CATALOG)
    raise ModelError(f"model not found: {text}", f"pass a .gguf file, a Hugging Face model directory, or one of: {names}")


def load_tokenizer(model: str | Path | None = None) -> Tokenizer:
    """Only the tokenizer of `model` (same names as `load`), without reading any weights."""
    path = resolve(model)[1]
    return tokenizer_from_hf(path) if path.is_dir() else tokenizer_from_gguf(GGUFFile(path).metadata, str(path))


def load(model: str | Path | None = None, *, dtype: str | torch.dtype = "float32",
         device: str | torch.device = "auto", pack: bool = True) -> Model:
    """Load a model. `dtype`: float32, bfloat16, float16, or int4 (bfloat16 compute; decode steps
    read 4-bit copies of the linear weights; CPU only). `pack` switches CPU linear layers to
    oneDNN's prepacked fast path."""
    started = time.perf_counter()
    torch_dtype, quant = parse_precision(dtype)
    torch_device = torch.device("cpu") if quant and str(device) == "auto" else parse_device(device)
    if quant and torch_device.type != "cpu":
        raise ConfigError(f"--dtype {dtype} (4-bit weights) runs on CPU only, not on {torch_device}",
                          "use --dtype bfloat16 on a GPU, or --device cpu")
    if quant and not int4.available():
        raise ConfigError(f"this torch build ({torch.__version__}) lacks the CPU 4-bit kernels --dtype int4 needs",
                          "use --dtype bfloat16, or install torch 2.13.0")
    name, path = resolve(model)
    if path.is_dir():
        config = config_from_hf(read_json(path / "config.json"), str(path))
        tokenizer = tokenizer_from_hf(path)
        tensors = hf_tensors(path, config)
    else:
        gguf = GGUFFile(path)
        config = config_from_gguf(gguf)
        tokenizer = tokenizer_from_gguf(gguf.metadata, str(path))
        tensors = gguf_tensors(gguf, config)
    decoder = build_model(config, tensors, torch_dtype, torch_device, str(path), pack=pack, quant=quant)
    trim_heap()  # the float32 decode of the file is freed by now: give its pages back (~100-200 MB)
    return Model(decoder, tokenizer, config, name, path, time.perf_counter() - started, quant)
