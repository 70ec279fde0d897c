"""Generation: the prefill/decode loop, sampling, stop strings and per-request stats."""

from blockmem.engine.generate import Completion, Engine, Stream
from blockmem.engine.sampler import Sampler, SamplingParams
from blockmem.engine.stats import Stats

__all__ = ["Completion", "Engine", "SamplingParams", "Sampler", "Stats", "Stream"]
