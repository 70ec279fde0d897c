"""The passkey generator: sized in the model's tokens, one needle, reproducible, scored strictly."""

from __future__ import annotations

import pytest

from blockmem.eval.passkey import FILLER, make_trial, parse_length


@pytest.mark.parametrize("length", [300, 1000, 2500])
def test_length_needle_and_determinism(tiny_llama, length: int) -> None:
    tok = tiny_llama.tokenizer
    unit = len(tok.encode(FILLER, special=False))  # filler comes in whole units
    trials = [make_trial(tok, length, i, seed=3) for i in range(5)]
    for trial in trials:
        assert length - unit - 2 <= trial.tokens <= length  # filled to the target, never past it
        assert trial.tokens == len(tok.encode(trial.prompt))
        assert trial.prompt.count(trial.key) == 2  # the needle sentence states it twice, once
        assert trial.prompt.count("The pass key is") == 2  # needle + question
        assert len(trial.key) == 5 and 0.0 <= trial.depth <= 1.0
    assert trials == [make_trial(tok, length, i, seed=3) for i in range(5)]
    assert [t.key for t in trials] != [make_trial(tok, length, i, seed=4).key for i in range(5)]
    assert len({t.key for t in trials}) > 1 and len({round(t.depth, 3) for t in trials}) > 1


def test_needle_depth_is_respected(tiny_llama) -> None:
    tok = tiny_llama.tokenizer
    for i in range(8):
        trial = make_trial(tok, 2000, i)
        where = trial.prompt.index(trial.key) / len(trial.prompt)
        assert abs(where - trial.depth) < 0.1


def test_scoring_takes_the_first_number_only() -> None:
    from blockmem.eval.passkey import Trial

    trial = Trial(100, 0, "12345", 0.5, "", 100)
    assert trial.score(" 12345.") and trial.score("The pass key is 12345")
    assert not trial.score(" 1234") and not trial.score(" 123456") and not trial.score(" 99999 12345")
    assert not trial.score(" the pass key")


def test_parse_length() -> None:
    assert parse_length("4k") == 4096 and parse_length("32K") == 32768 and parse_length("1000") == 1000
    assert parse_length("0.5k") == 512


def test_prose_haystack(tiny_llama) -> None:
    from blockmem.eval.passkey import prose_verses

    tok = tiny_llama.tokenizer
    trials = [make_trial(tok, 1500, i, haystack="prose") for i in range(4)]
    for trial in trials:
        assert 1500 - 120 <= trial.tokens <= 1500  # within about one verse
        assert trial.prompt.count(trial.key) == 2 and FILLER not in trial.prompt
    verses = prose_verses()
    assert len(verses) > 30000 and verses[0].startswith("In the beginning")
    starts = {next(v for v in verses if v in t.prompt) for t in trials}
    assert len(starts) > 1  # different trials read different passages
    assert trials == [make_trial(tok, 1500, i, haystack="prose") for i in range(4)]


def test_an_answer_is_decided_once_its_first_number_is_complete() -> None:
    from blockmem.eval.passkey import answer_decided

    assert answer_decided(" 12345.") and answer_decided(" 123 and") and answer_decided("x 7 ")
    assert not answer_decided(" the pass key. 732")  # the number may go on
    assert not answer_decided(" the pass key. The pass key is") and not answer_decided("")


def _passkey_script():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "benchmarks" / "passkey.py"
    spec = importlib.util.spec_from_file_location("passkey_script", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_larger_answer_budget_reruns_only_undecided_trials(tiny, tmp_path) -> None:
    """benchmarks/passkey.py --new-tokens over an existing file: undecided answers run again and
    the new record supersedes the old (greedy: it extends the old answer); decided ones stand."""
    import argparse
    import json

    script = _passkey_script()
    assert script.settled({"answer": " 12345.", "correct": True}, 24)  # 8 tokens, decided
    assert not script.settled({"answer": " the pass key. 73", "correct": False}, 24)
    assert script.settled({"answer": " the pass", "new_tokens": 24}, 16) and not script.settled(None, 8)
    assert script.settled({"trial": -1, "refused": "too long"}, 24)
    directory, _ = tiny.get("llama")
    out = tmp_path / "p.jsonl"
    args = argparse.Namespace(model=str(directory), lengths="200", methods="dense", trials=3, indices=None, seed=0,
                              haystack="filler", threads=1, dtype="float32", out=out, new_tokens=2)
    script.run(args)
    first = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["new_tokens"] for r in first] == [2, 2, 2]
    script.run(argparse.Namespace(**{**vars(args), "new_tokens": 5}))
    records = [json.loads(line) for line in out.read_text().splitlines()]
    again = records[3:]
    undecided = [r for r in first if not script.answer_decided(r["answer"])]
    assert [r["trial"] for r in again] == [r["trial"] for r in undecided]
    for old, new in zip(undecided, again):
        assert new["new_tokens"] == 5 and new["answer"].startswith(old["answer"])
    latest = script.latest(out)
    assert len(latest) == 3 and all(latest[("dense", 200, r["trial"])] == r for r in again)
    assert "| dense | " in script.table(out) and "/3 |" in script.table(out)
