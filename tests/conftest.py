"""Shared fixtures: tiny random models per family (built once per session) and the real
packaged models. Tests run single-threaded so two test processes never fight for cores."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from tiny import build_hf_model

FAMILIES = ["llama", "llama3", "mistral", "qwen2", "qwen3", "gemma3"]


def pytest_configure(config: pytest.Config) -> None:
    torch.set_num_threads(int(os.environ.get("BLOCKMEM_TEST_THREADS", "1")))


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    # Tokenizer caches go to a per-session folder, never the user's ~/.cache.
    monkeypatch.setenv("BLOCKMEM_CACHE", str(tmp_path_factory.getbasetemp() / "blockmem-cache"))


class TinyModels:
    """family -> (HF directory, transformers reference model), built on first use."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._built: dict[tuple[str, bool], tuple[Path, torch.nn.Module]] = {}

    def get(self, family: str, wide: bool = False) -> tuple[Path, torch.nn.Module]:
        key = (family, wide)
        if key not in self._built:
            directory = self.root / f"{family}{'-wide' if wide else ''}"
            self._built[key] = (directory, build_hf_model(family, directory, wide=wide))
        return self._built[key]


@pytest.fixture(scope="session")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> TinyModels:
    return TinyModels(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="session")
def tiny_llama(tiny: TinyModels):
    """A loaded blockmem model (tiny Llama) for engine and CLI tests."""
    import blockmem

    directory, _ = tiny.get("llama")
    return blockmem.load(directory, device="cpu")


@pytest.fixture(scope="session")
def smollm2():
    import blockmem

    return blockmem.load("smollm2-135m", device="cpu")
