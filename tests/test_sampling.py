"""Sampling rules and stop strings."""

from __future__ import annotations

import pytest
import torch

from blockmem.engine.sampler import Sampler, SamplingParams
from blockmem.engine.stops import StopMatcher
from blockmem.errors import ConfigError

LOGITS = torch.tensor([1.0, 3.0, 2.0, 0.5, 2.9])


def test_greedy_is_argmax() -> None:
    assert Sampler(SamplingParams())(LOGITS) == 1


def test_seed_makes_sampling_repeatable() -> None:
    params = SamplingParams(temperature=1.0, seed=7)
    first = [Sampler(params)(LOGITS) for _ in range(1)] + [s for s in _draws(params, 50)]
    assert first[1:] == _draws(params, 50)
    assert len(set(_draws(SamplingParams(temperature=1.0, seed=8), 200))) > 2


def _draws(params: SamplingParams, n: int) -> list[int]:
    sampler = Sampler(params)
    return [sampler(LOGITS) for _ in range(n)]


def test_top_k_restricts_support() -> None:
    draws = set(_draws(SamplingParams(temperature=5.0, top_k=2, seed=0), 300))
    assert draws == {1, 4}


def test_top_p_keeps_smallest_set_reaching_p() -> None:
    sampler = Sampler(SamplingParams(temperature=1.0, top_p=0.6, seed=0))
    probs = sampler.probabilities(LOGITS)
    full = torch.softmax(LOGITS, 0)  # sorted: 1 (0.37), 4 (0.34), 2 (0.14), ...
    assert probs.nonzero().flatten().tolist() == [1, 4]
    assert torch.allclose(probs[[1, 4]], full[[1, 4]] / full[[1, 4]].sum())
    assert Sampler(SamplingParams(temperature=1.0, top_p=0.3)).probabilities(LOGITS).nonzero().flatten().tolist() == [1]


@pytest.mark.parametrize("bad", [dict(temperature=-1), dict(top_p=0), dict(top_p=1.5), dict(top_k=-2),
                                 dict(max_new_tokens=0), dict(stop=("",)), dict(temperature=float("nan"))])
def test_invalid_settings_are_refused(bad) -> None:
    with pytest.raises(ConfigError):
        SamplingParams(**bad)


def test_stop_matcher_holds_back_partial_matches() -> None:
    stops = StopMatcher(("END", "\n\n"))
    assert stops.feed("Hello E") == "Hello "  # "E" might start "END"
    assert stops.feed("N") == ""
    assert stops.feed("Dless") == ""  # completed "END": stop, drop the rest
    assert stops.stopped and stops.flush() == ""
    other = StopMatcher(("END",))
    assert other.feed("The EN") == "The " and other.feed("ergy") == "ENergy" and other.flush() == ""
    tail = StopMatcher(("END",))
    assert tail.feed("x E") == "x " and tail.flush() == "E"
