"""Selection telemetry: per layer and step, what attention read.

For each `attend` call (a prefill chunk or a decode step) a layer reports the tokens each query
attended and the blocks it selected. Locality is the fraction of a step's selected (head, block)
pairs that the same layer also selected at the previous step: high locality means few blocks move
between memory tiers. Decode steps and prefill chunks are summarized separately.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class _Phase:
    steps: int = 0
    tokens: int = 0
    blocks: int = 0
    locality_sum: float = 0.0
    locality_steps: int = 0

    def summary(self) -> dict[str, float]:
        if not self.steps:
            return {}
        return {"steps": self.steps, "tokens_attended": round(self.tokens / self.steps, 1),
                "blocks_selected": round(self.blocks / self.steps, 2),
                "locality": round(self.locality_sum / self.locality_steps, 4) if self.locality_steps else None}


@dataclass
class _Layer:
    prefill: _Phase = field(default_factory=_Phase)
    decode: _Phase = field(default_factory=_Phase)
    previous: list[list[int]] | None = None  # block ids each KV head selected at the previous step


class Telemetry:
    def __init__(self, layers: int, keep_steps: bool = False) -> None:
        self.layers = [_Layer() for _ in range(layers)]
        self.steps: list[dict[str, Any]] | None = [] if keep_steps else None

    def record(self, layer: int, queries: int, tokens_attended: int, selected: list[list[int]] | None,
               prefill: bool = False) -> None:
        """`selected`: the block ids read per KV head, [Hkv][k] (None when no blocks exist yet).
        Plain lists: a decode step records every layer, and set arithmetic on a few ids costs less
        than tensor ops. A step of one query is a decode step unless `prefill` (a piece of a chunk)."""
        state = self.layers[layer]
        phase = state.decode if queries == 1 and not prefill else state.prefill
        phase.steps += 1
        phase.tokens += tokens_attended
        if selected and selected[0]:
            phase.blocks += len(selected[0])
            previous = state.previous
            if previous is not None and len(previous) == len(selected):
                # per head: which of this step's blocks that head also read last step
                kept = sum(len(set(now).intersection(before)) for now, before in zip(selected, previous))
                phase.locality_sum += kept / (len(selected) * len(selected[0]))
                phase.locality_steps += 1
        state.previous = selected
        if self.steps is not None:
            self.steps.append({"layer": layer, "queries": queries, "tokens_attended": tokens_attended,
                               "blocks": selected if selected is not None else []})

    def summary(self) -> dict[str, Any]:
        """Means over layers for decode and prefill, plus per-layer decode figures."""
        out: dict[str, Any] = {}
        for name in ("prefill", "decode"):
            per_layer = [getattr(layer, name).summary() for layer in self.layers]
            active = [s for s in per_layer if s]
            if not active:
                continue
            localities = [s["locality"] for s in active if s["locality"] is not None]
            out[name] = {
                "steps": active[0]["steps"],
                "tokens_attended": round(sum(s["tokens_attended"] for s in active) / len(active), 1),
                "blocks_selected": round(sum(s["blocks_selected"] for s in active) / len(active), 2),
                "locality": round(sum(localities) / len(localities), 4) if localities else None,
            }
            if name == "decode":
                out["decode"]["locality_per_layer"] = [s.get("locality") for s in per_layer]
        return out
