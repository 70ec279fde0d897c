"""Per-request measurements: token counts, phase timings, peak memory."""

from __future__ import annotations

import resource
import sys
from dataclasses import asdict, dataclass

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
    kv_cache_bytes: int = 0

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
        return (f"prompt {self.prompt_tokens} tok | prefill {self.prefill_tokens_per_second:.1f} tok/s | "
                f"TTFT {self.time_to_first_token:.2f} s | decode {self.decode_tokens_per_second:.1f} tok/s "
                f"({self.generated_tokens} tok) | peak RSS {self.peak_rss_bytes / 2**20:.0f} MiB{gpu}")
