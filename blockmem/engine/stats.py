"""Per-request measurements: token counts, phase timings, peak memory."""

from __future__ import annotations

import resource
import sys
from dataclasses import asdict, dataclass
from typing import Any

import torch


def peak_gpu_bytes(device: torch.device) -> int:
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # Linux reports KiB


@dataclass
class Stats:
    prompt_tokens: int = 0
    generated_tokens: int = 0  # tokens returned (an EOS that ended the run is not one)
    decode_steps: int = 0  # forward passes after prefill
    prefill_seconds: float = 0.0
    time_to_first_token: float = 0.0  # prefill plus sampling the first token
    decode_seconds: float = 0.0  # after the first token
    peak_rss_bytes: int = 0
    peak_gpu_bytes: int = 0  # torch's peak allocation on a CUDA device (0 on CPU)
    kv_cache_bytes: int = 0  # keys and values held, wherever they live
    memory_tokens: int = 0  # tokens already in a saved memory the prompt continued
    resident_kv_bytes: int | None = None  # of kv_cache_bytes, those in RAM or on the device (tiers on)
    bytes_moved_per_token: int | None = None  # between memory tiers per decode step (tiers on)
    tiers: dict[str, Any] | None = None  # per-tier residency, hits, budgets (memory.tiers.Tiers.stats)

    @property
    def prefill_tokens_per_second(self) -> float:
        return self.prompt_tokens / self.prefill_seconds if self.prefill_seconds > 0 else 0.0

    @property
    def decode_tokens_per_second(self) -> float:
        steps = self.decode_steps
        return steps / self.decode_seconds if steps > 0 and self.decode_seconds > 0 else 0.0

    def to_dict(self) -> dict[str, float | int]:
        out = asdict(self)
        out["prefill_tokens_per_second"] = round(self.prefill_tokens_per_second, 2)
        out["decode_tokens_per_second"] = round(self.decode_tokens_per_second, 2)
        return out

    def summary(self) -> str:
        gpu = f" | peak GPU {self.peak_gpu_bytes / 2**20:.0f} MiB" if self.peak_gpu_bytes else ""
        memory = f"memory {self.memory_tokens} tok + " if self.memory_tokens else ""
        return (f"{memory}prompt {self.prompt_tokens} tok | prefill {self.prefill_tokens_per_second:.1f} tok/s | "
                f"TTFT {self.time_to_first_token:.2f} s | decode {self.decode_tokens_per_second:.1f} tok/s "
                f"({self.generated_tokens} tok) | peak RSS {self.peak_rss_bytes / 2**20:.0f} MiB{gpu}")

    def tier_summary(self) -> str:
        """One line on where the memory's blocks were and what moved (tiers on), else ''."""
        if not self.tiers:
            return ""
        parts = []
        for name in ("device", "ram"):
            tier = self.tiers.get(name)
            if tier:
                rate = f", hit rate {tier['hit_rate']:.2f}" if tier["hit_rate"] is not None else ""
                budget = f" of {tier['budget_bytes'] / 2**20:.0f} MiB" if tier["budget_bytes"] else ""
                parts.append(f"{name} {tier['resident_bytes'] / 2**20:.0f} MiB{budget}{rate}")
        disk = self.tiers.get("disk")
        if disk:
            parts.append(f"disk {disk['spilled_blocks'] + disk['saved_blocks']} blocks")
        if self.bytes_moved_per_token is not None:
            parts.append(f"{self.bytes_moved_per_token / 2**20:.2f} MiB moved per token")
        return "tiers: " + " | ".join(parts)
