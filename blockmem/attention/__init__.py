"""Attention methods, chosen by name. Adding one: write its module, add it to METHODS, and add
it to the shared test matrix in tests/test_attention.py."""

from __future__ import annotations

from typing import Any

from blockmem.attention.base import AttentionMethod, KVCache, LayerCache, LayerSpec
from blockmem.attention.dense import DenseMethod
from blockmem.errors import ConfigError

METHODS: dict[str, type[AttentionMethod]] = {
    DenseMethod.name: DenseMethod,
}


def create_method(name: str, **options: Any) -> AttentionMethod:
    """The method registered as `name`, built with its validated `options`."""
    try:
        cls = METHODS[name]
    except KeyError:
        raise ConfigError(f"unknown attention method {name!r}",
                          f"choose one of: {', '.join(sorted(METHODS))}") from None
    try:
        return cls(**options)
    except TypeError as exc:
        raise ConfigError(f"invalid options for method {name!r}: {exc}") from None


__all__ = ["AttentionMethod", "KVCache", "LayerCache", "LayerSpec", "METHODS", "create_method"]
