"""The context memory: per layer, sinks, a window of recent tokens, and blocks of older ones
with summaries, stored behind the `BlockStore` contract so later tiers can move blocks."""

from blockmem.memory.layer import LayerMemory, Window
from blockmem.memory.store import BlockStore

__all__ = ["BlockStore", "LayerMemory", "Window"]
