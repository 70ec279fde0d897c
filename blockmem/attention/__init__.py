"""Attention methods, chosen by name. Adding one: write its module, add it to METHODS, and add
it to the shared test matrix in tests/test_attention.py."""

from __future__ import annotations

import dataclasses
from typing import Any

from blockmem.attention.base import AttentionMethod, KVCache, LayerCache, LayerSpec
from blockmem.attention.blocksparse import BlockSparseMethod
from blockmem.attention.dense import DenseMethod
from blockmem.attention.infllm import InfLLMMethod
from blockmem.attention.nosa import NosaMethod
from blockmem.attention.quest import QuestMethod
from blockmem.attention.sparse import Position, SparseMethod
from blockmem.attention.streaming import StreamingMethod
from blockmem.errors import ConfigError

METHODS: dict[str, type[AttentionMethod]] = {
    method.name: method
    for method in (DenseMethod, StreamingMethod, InfLLMMethod, BlockSparseMethod, NosaMethod, QuestMethod)
}


def method_options(name: str) -> list[str]:
    """The option names the method `name` accepts."""
    cls = METHODS[name]
    return [f.name for f in dataclasses.fields(cls)] if dataclasses.is_dataclass(cls) else []


def option_flag(name: str) -> str:
    """An option as the command line spells it: pooled_rows -> --pooled-rows."""
    return "--" + name.replace("_", "-")


def create_method(name: str, **options: Any) -> AttentionMethod:
    """The method registered as `name`, built with its validated `options`. Options given that
    would change nothing (`AttentionMethod.idle_options`) are refused, not silently ignored."""
    method = restore_method(name, options)
    names, shaped, fix = method.idle_options()
    idle = [key for key in options if key in names]
    if idle:
        flags = " and ".join(map(option_flag, idle))
        verb = "shapes" if len(idle) == 1 else "shape"
        raise ConfigError(f"{flags} {verb} {shaped}", f"leave {'it' if len(idle) == 1 else 'them'} out, or {fix}")
    return method


def restore_method(name: str, options: dict[str, Any]) -> AttentionMethod:
    """The method `name` with every option a saved header records, idle ones included."""
    if name not in METHODS:
        raise ConfigError(f"unknown attention method {name!r}", f"choose one of: {', '.join(METHODS)}")
    accepted = method_options(name)
    unknown = [key for key in options if key not in accepted]
    if unknown:
        flags = ", ".join(map(option_flag, unknown))
        takes = ", ".join(map(option_flag, accepted)) or "no options"
        raise ConfigError(f"{flags} does not apply to the {name} method", f"{name} takes {takes}")
    return METHODS[name](**options)


__all__ = ["AttentionMethod", "KVCache", "LayerCache", "LayerSpec", "METHODS", "Position", "SparseMethod",
           "create_method", "method_options", "option_flag", "restore_method"]
