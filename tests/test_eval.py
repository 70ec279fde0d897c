"""The evaluation harness: task generators, metrics, perplexity, the resumable runner, peers' error
paths, the report, and `eval` -> `report` end to end on a tiny model."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import torch

from blockmem.errors import ConfigError
from blockmem.eval.metrics import clean, first_number, score, string_match_all, string_match_part
from blockmem.eval.tasks import GROUPS, TASKS, TaskOptions, make_sample, resolve_tasks
from blockmem.eval.tasks.ruler import NIAH

SYNTHETIC = [name for name in TASKS if not name.startswith("qa_")]


@pytest.fixture(scope="module")
def tok():
    from blockmem.model.loader import load_tokenizer

    return load_tokenizer("smollm2-135m")


# ---- metrics (hand-checked) -------------------------------------------------------------------

def test_metrics_hand_checked() -> None:
    assert clean("a\x00b\nc\td\x1f ") == "a b c d"
    assert string_match_all("The numbers are 123 and 456.", ["123", "456"]) == 1.0
    assert string_match_all("The numbers are 123.", ["123", "456"]) == 0.5
    assert string_match_all("nothing", ["123", "456"]) == 0.0
    assert string_match_all("APPLE, Pear", ["apple", "pear", "plum"]) == pytest.approx(2 / 3)  # case-insensitive
    assert string_match_all("12\n3", ["12 3"]) == 1.0  # control characters become spaces
    assert string_match_part("It was in Paris, France.", ["paris", "Lyon"]) == 1.0
    assert string_match_part("It was in Rome.", ["paris", "Lyon"]) == 0.0
    assert first_number(" 12345. Remember", ["12345"]) == 1.0
    assert first_number(" 99 then 12345", ["12345"]) == 0.0
    assert first_number(" no digits", ["12345"]) == 0.0
    assert score("all", "x 1 y", ["1"]) == 1.0
    with pytest.raises(ConfigError, match="unknown metric"):
        score("bleu", "x", ["x"])


# ---- generators -------------------------------------------------------------------------------

@pytest.mark.parametrize("name", SYNTHETIC)
def test_generator_hits_length_and_is_deterministic(tok, name: str) -> None:
    for length in (2048, 6000):
        sample = make_sample(name, tok, length, 3, seed=7)
        context, question = sample.prompt_ids(tok)
        assert sample.tokens == len(context) + len(question)
        assert sample.tokens + sample.max_new_tokens <= length  # the answer fits too
        # within 3% of the target, or one haystack unit (a UUID needle is ~60 tokens)
        assert sample.tokens + sample.max_new_tokens >= length - max(0.03 * length, 100)
        assert make_sample(name, tok, length, 3, seed=7) == sample  # same arguments, same sample
        assert make_sample(name, tok, length, 4, seed=7).context != sample.context
        assert make_sample(name, tok, length, 3, seed=8).context != sample.context
        assert sample.references and all(sample.references)


@pytest.mark.parametrize("name", list(NIAH))
def test_niah_needles_present_exactly_once(tok, name: str) -> None:
    spec = NIAH[name]
    sample = make_sample(name, tok, 3000, 0)
    assert len(sample.references) == spec.num_values * spec.num_queries
    for value in sample.references:
        assert sample.context.count(value) == 1
    needles = re.findall(r"One of the special magic \w+ for (\S+) is: (\S+)\. ", sample.context)
    keys = Counter(key for key, _ in needles)
    asked = re.search(r"magic \w+ for (.*?) mentioned", sample.question).group(1)
    for key in re.split(r", | and ", asked):
        assert keys[key] == spec.num_values  # the asked key's needles, each once
    if spec.haystack == "needles":  # the haystack is made of distractor needles with other keys
        assert len(keys) > 20


def test_needle_depth_is_controlled(tok) -> None:
    for depth in (0.0, 0.5, 1.0):
        sample = make_sample("niah_single_2", tok, 4000, 0, options=TaskOptions(depths=[depth]))
        where = sample.context.index(sample.references[0]) / len(sample.context)
        assert abs(where - depth) < 0.06, (depth, where)
        assert sample.depth == depth
    passkey = make_sample("passkey", tok, 4000, 0, options=TaskOptions(depths=[0.25]))
    assert abs(passkey.context.index(passkey.references[0]) / len(passkey.context) - 0.25) < 0.05
    # samples cycle through the depths
    assert [make_sample("niah_single_1", tok, 1024, i).depth for i in range(6)] == [0, 0.25, 0.5, 0.75, 1.0, 0]


def test_variable_tracking_chain(tok) -> None:
    sample = make_sample("vt", tok, 3000, 1)
    value = re.search(r"assigned the value (\d+)", sample.question).group(1)
    chain = re.findall(r"VAR (\w+) = (VAR \w+|\d+)\. ", sample.context)
    assert [name for name, _ in chain] == list(sample.references)
    assert chain[0][1] == value
    for (previous, _), (_, source) in zip(chain, chain[1:]):
        assert source == f"VAR {previous}"  # each hop names the one before it


def test_common_and_frequent_words_answers_are_the_most_frequent(tok) -> None:
    cwe = make_sample("cwe", tok, 4000, 2)
    counts = Counter(re.findall(r"^\d+\. (\w+)$", cwe.context, flags=re.M))
    top = [word for word, _ in counts.most_common(10)]
    assert sorted(top) == sorted(cwe.references)
    assert min(counts[w] for w in cwe.references) > max(c for w, c in counts.items() if w not in cwe.references)
    fwe = make_sample("fwe", tok, 4000, 2)
    body = fwe.context.split("\n", 1)[1]
    counts = Counter(w for w in body.split() if w != "....")
    ranked = counts.most_common(4)
    assert [w for w, _ in ranked[:3]] == list(fwe.references) and ranked[2][1] > ranked[3][1]


def _squad(path: Path) -> Path:
    paragraphs = [{"context": f"Paragraph {i} tells that the river number {i} is called Flow{i}.",
                   "qas": [{"question": f"What is river {i} called?", "answers": [{"text": f"Flow{i}"}],
                            "is_impossible": False}]} for i in range(200)]
    path.write_text(json.dumps({"data": [{"title": "rivers", "paragraphs": paragraphs}]}))
    return path


def _hotpot(path: Path) -> Path:
    entries = [{"question": f"Where was person {i} born?", "answer": f"Town{i}",
                "supporting_facts": [[f"P{i}", 0], [f"T{i}", 0]],
                "context": [[f"P{i}", [f"Person {i} was born in the town described next. "]],
                            [f"T{i}", [f"That town is Town{i}, on a hill. "]]]} for i in range(200)]
    path.write_text(json.dumps(entries))
    return path


def test_qa_tasks_from_user_files(tok, tmp_path: Path) -> None:
    options = TaskOptions(squad=str(_squad(tmp_path / "squad.json")), hotpot=str(_hotpot(tmp_path / "hotpot.json")))
    assert resolve_tasks("ruler", options)[-2:] == ["qa_squad", "qa_hotpot"]
    assert "qa_squad" not in resolve_tasks("ruler")
    squad = make_sample("qa_squad", tok, 2000, 0, options=options)
    answer = squad.references[0]
    question_number = re.search(r"river (\d+)", squad.question).group(1)
    assert answer == f"Flow{question_number}" and squad.context.count(f"is called {answer}.") == 1
    assert squad.metric == "part" and squad.tokens + squad.max_new_tokens <= 2000
    hotpot = make_sample("qa_hotpot", tok, 2000, 1, options=options)
    number = re.search(r"person (\d+)", hotpot.question).group(1)
    gold = [f"Person {number} was born", f"That town is Town{number}"]
    assert all(hotpot.context.count(g) == 1 for g in gold)
    assert hotpot.context.index(gold[0]) < hotpot.context.index(gold[1])  # the gold paragraphs stay together
    with pytest.raises(ConfigError, match="needs the SQuAD file"):
        make_sample("qa_squad", tok, 2000, 0)
    (tmp_path / "bad.json").write_text('{"data": [{"nope": 1}]}')
    with pytest.raises(ConfigError, match="is not a SQuAD file"):
        make_sample("qa_squad", tok, 2000, 0, options=TaskOptions(squad=str(tmp_path / "bad.json")))


def test_task_groups_and_unknown_names() -> None:
    assert resolve_tasks("ruler") == GROUPS["ruler"] and len(GROUPS["ruler"]) == 11
    assert resolve_tasks("passkey,niah,passkey") == ["passkey", *NIAH]
    assert resolve_tasks("all")[-2:] == ["passkey", "perplexity"]
    with pytest.raises(ConfigError, match="unknown task 'needle'"):
        resolve_tasks("needle")


def test_too_short_length_is_a_clear_error(tok) -> None:
    with pytest.raises(ConfigError, match="ask for a longer length"):
        make_sample("niah_multiquery", tok, 120, 0)


# ---- perplexity -------------------------------------------------------------------------------

def test_perplexity_buckets_hand_checked() -> None:
    from blockmem.eval.perplexity import bucket_edges, by_bucket

    assert bucket_edges(1000) == [0, 256, 512, 1000]
    losses = [1.0] * 255 + [2.0] * 256 + [3.0] * 488  # tokens 1..999
    buckets = by_bucket(losses, 1000)
    assert [(b["start"], b["end"], b["tokens"], b["loss"]) for b in buckets] == [
        (0, 256, 255, 1.0), (256, 512, 256, 2.0), (512, 1000, 488, 3.0)]
    assert buckets[0]["ppl"] == pytest.approx(2.718, abs=1e-3)


def test_length_label() -> None:
    from blockmem.eval.report import length_label

    assert [length_label(n) for n in (0, 512, 1024, 1536, 8192, 131072)] == ["0", "512", "1K", "1536", "8K", "128K"]


def test_perplexity_table_hand_checked() -> None:
    from blockmem.eval.report import perplexity_table

    buckets = [{"start": 0, "end": 512, "loss": 2.0}, {"start": 512, "end": 2048, "loss": 1.0}]
    records = [{"task": "perplexity", "length": 2048, "system": "dense", "index": i, "loss": 1.5,
                "buckets": buckets} for i in range(2)]
    records.append({"task": "perplexity", "length": 2048, "system": "streaming", "index": 0, "refused": "x"})
    lines = perplexity_table(records).splitlines()
    assert lines[0] == "### Perplexity at 2K tokens, by position"
    assert lines[2] == "| system | samples | 0-512 | 512-2K | all |"
    assert lines[4] == "| dense | 2 | 7.39 | 2.72 | 4.48 |"  # e^2, e^1, e^1.5
    assert lines[5] == "| streaming | 1 | refused | refused | refused |"


def test_token_losses_equal_full_forward(tiny_llama) -> None:
    import blockmem
    from blockmem.model.decoder import Logits

    ids = list(range(3, 3 + 150))
    engine = blockmem.Engine(tiny_llama, prefill_chunk=64)
    losses = engine.token_losses(ids)
    with torch.inference_mode():
        logits = tiny_llama.decoder(torch.tensor([ids]), engine.new_cache(), Logits.ALL)[0]
    expected = torch.nn.functional.cross_entropy(logits[:-1].float(), torch.tensor(ids[1:]), reduction="none")
    assert losses.shape == (149,) and torch.allclose(losses, expected, atol=1e-5)
    # a block-memory method that reads every block gives the same losses
    sparse = blockmem.Engine(tiny_llama, method=blockmem.create_method("infllm", block_size=16, topk=64, n_local=32,
                                                                         n_init=4, position="true"), prefill_chunk=64)
    assert torch.allclose(sparse.token_losses(ids), expected, atol=1e-4)


# ---- systems ----------------------------------------------------------------------------------

def test_system_specs_are_validated() -> None:
    from blockmem.eval.systems import parse_systems

    systems = parse_systems("dense;infllm:topk=8,n_local=64", "transformers,kvpress,kvpress:tova@0.25", 0.5)
    assert [s.label for s in systems] == ["dense", "infllm:topk=8,n_local=64", "transformers", "kvpress:streaming@0.5",
                                          "kvpress:snapkv@0.5", "kvpress:knorm@0.5", "kvpress:tova@0.25"]
    assert systems[1].options == {"topk": 8, "n_local": 64}
    for methods, peers, message in (("quick", None, "unknown attention method"),
                                    ("infllm:topk=8,bogus=1", None, "does not apply"),
                                    ("infllm:topk=abc", None, "are not valid"),
                                    ("dense", "vllm", "unknown peer"),
                                    ("dense", "kvpress:magic", "unknown kvpress press"),
                                    ("dense,dense", None, "named twice"),
                                    ("", "", "nothing to evaluate")):
        with pytest.raises(ConfigError, match=message):
            parse_systems(methods, peers)
    with pytest.raises(ConfigError, match="kv-ratio"):
        parse_systems("dense", None, 1.5)
    assert parse_systems("infllm@int4", None)[0].dtype == "int4"
    with pytest.raises(ConfigError, match="unknown dtype"):
        parse_systems("infllm@int3", None)


def test_transformers_cache_argument_follows_the_installed_version() -> None:
    from blockmem.eval.systems import cache_kwargs

    class Renamed:  # transformers 5.2x: forward(..., cache=...)
        def forward(self, input_ids, cache=None, past_key_values=None): ...

    class Older:
        def forward(self, input_ids, past_key_values=None): ...

    assert cache_kwargs(Renamed(), "C") == {"cache": "C"}
    assert cache_kwargs(Older(), "C") == {"past_key_values": "C"}


def test_kvpress_peer_without_kvpress_is_a_clear_error(tok, tmp_path: Path) -> None:
    import importlib.util
    import sys

    from blockmem.eval.systems import KvpressAnswerer, SystemSpec

    if importlib.util.find_spec("kvpress") is not None:
        pytest.skip("kvpress is installed in this Python")
    spec = SystemSpec("kvpress:snapkv@0.5", "kvpress", "snapkv", ratio=0.5)
    with pytest.raises(ConfigError, match="kvpress peer stopped") as info:
        KvpressAnswerer(spec, tmp_path / "m.gguf", tok, sys.executable, 1, tmp_path / "log")
    assert "--kvpress-python" in info.value.fix
    assert "kvpress" in (tmp_path / "log").read_text()  # the worker's ImportError is in the log


def test_a_kvpress_peer_killed_by_a_signal_is_named_by_it(tok, tmp_path: Path) -> None:
    from blockmem.eval.systems import KvpressAnswerer, SystemSpec

    killer = tmp_path / "python"  # stands in for kvpress's Python: dies by SIGKILL once it has read a request
    killer.write_text("#!/bin/sh\nread line\nkill -KILL $$\n")
    killer.chmod(0o755)
    spec = SystemSpec("kvpress:snapkv@0.5", "kvpress", "snapkv", ratio=0.5)
    with pytest.raises(ConfigError, match="kvpress peer was killed by SIGKILL") as info:
        KvpressAnswerer(spec, tmp_path / "m.gguf", tok, str(killer), 1, tmp_path / "log")
    assert "out of memory" in info.value.fix and "--kvpress-python" not in info.value.fix


def test_a_crashed_worker_is_named_by_its_signal_and_llamacpp_gets_the_known_cause() -> None:
    from blockmem.eval.systems import worker_failure

    crashed = subprocess.run([sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGSEGV)"])
    assert crashed.returncode < 0
    llama = worker_failure("llamacpp", crashed.returncode, "llama_context: n_ctx_seq (8448) > n_ctx_train (8192)")
    assert llama.startswith("the worker failed (killed by SIGSEGV): llama_context")
    assert "AMX" in llama and "docs/eval.md#peers" in llama
    other = worker_failure("blockmem", crashed.returncode, None)
    assert other == "the worker failed (killed by SIGSEGV)"
    assert worker_failure("llamacpp", 1, "ValueError: x") == "the worker failed (exit status 1): ValueError: x"


# ---- runner, report, CLI ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def long_tiny(tiny, tmp_path_factory) -> Path:
    """The tiny Llama with a 2K window, so that dense answers 512-token prompts."""
    source, _ = tiny.get("llama")
    directory = tmp_path_factory.mktemp("long-tiny")
    shutil.copytree(source, directory, dirs_exist_ok=True)
    config = json.loads((directory / "config.json").read_text())
    config["max_position_embeddings"] = 2048
    (directory / "config.json").write_text(json.dumps(config))
    return directory


def _plan(model: Path, out: Path, **overrides):
    from blockmem.eval.runner import EvalPlan
    from blockmem.eval.systems import parse_systems

    fields = dict(model=str(model), tasks=["niah_single_1", "passkey"], lengths=[512],
                  systems=parse_systems("dense,streaming:n_local=64,n_init=8", None), samples=2, out=out, threads=1)
    fields.update(overrides)
    return EvalPlan(**fields)


def test_dense_counts_tokens_read_as_the_telemetry_does(long_tiny: Path, tmp_path: Path) -> None:
    """Dense has no selection telemetry; its count must still be the one a sparse method reports
    when it reads every key (blocksparse below its switch length), or the cost tables compare two
    different counts."""
    from blockmem.eval.runner import read_records, run_eval
    from blockmem.eval.systems import parse_systems

    out = tmp_path / "results.jsonl"
    plan = _plan(long_tiny, out, tasks=["passkey"], samples=1, systems=parse_systems("dense,blocksparse", None))
    assert run_eval(plan) == []
    dense, sparse = (next(r for r in read_records(out) if r["system"] == name) for name in ("dense", "blocksparse"))
    assert dense["generated"] == sparse["generated"] > 1  # the same answer, decoded over several steps
    assert dense["tokens_attended"] == sparse["tokens_attended"] == dense["tokens"] + dense["generated"] / 2


def test_runner_resumes_and_repairs_a_torn_record(long_tiny: Path, tmp_path: Path) -> None:
    from blockmem.eval.runner import read_records, run_eval

    out = tmp_path / "results.jsonl"
    seen: list[dict] = []
    assert run_eval(_plan(long_tiny, out), on_record=seen.append) == []
    records = read_records(out)
    assert len(records) == len(seen) == 2 * 2 * 2
    # index by index, so that a stopped run leaves every task with about the same count
    assert [(r["task"], r["index"]) for r in records if r["system"] == "dense"] == \
        [("niah_single_1", 0), ("passkey", 0), ("niah_single_1", 1), ("passkey", 1)]
    first = records[0]
    for key in ("task", "length", "depth", "system", "score", "prediction", "latency", "tokens_attended",
                "bytes_moved_per_token", "peak_rss_mib", "tokens", "references"):
        assert key in first
    assert {r["system"] for r in records} == {"dense", "streaming:n_local=64,n_init=8"}
    streaming = [r for r in records if r["system"].startswith("streaming")]
    assert all(r["tokens_attended"] < r["tokens"] for r in streaming)  # it read less than the prompt
    # kill mid-write: drop the last two records and leave half a line
    lines = out.read_text().splitlines(keepends=True)
    out.write_text("".join(lines[:-2]) + lines[-2][:40])
    seen.clear()
    assert run_eval(_plan(long_tiny, out), on_record=seen.append) == []
    assert len(seen) == 2  # only what was missing ran again
    again = read_records(out)
    assert len(again) == 8 and all(line.startswith("{") for line in out.read_text().splitlines())
    assert again[-1]["prediction"] == records[-1]["prediction"]  # deterministic: the same answer
    # more samples later: only the new ones run
    seen.clear()
    run_eval(_plan(long_tiny, out, samples=3), on_record=seen.append)
    assert sorted({r["index"] for r in seen}) == [2] and len(seen) == 4


def test_runner_jobs_deal_samples_to_workers_at_once(long_tiny: Path, tmp_path: Path) -> None:
    from blockmem.eval.runner import read_records, run_eval

    alone, together = tmp_path / "one.jsonl", tmp_path / "two.jsonl"
    assert run_eval(_plan(long_tiny, alone, samples=3)) == []
    planned: list[int] = []
    groups: list[tuple[str, int, int]] = []
    seen: list[dict] = []
    assert run_eval(_plan(long_tiny, together, samples=3, jobs=2), seen.append,
                    lambda *group: groups.append(group), planned.append) == []
    assert planned == [2 * 2 * 3]
    # each system's 6 samples dealt to two workers of 3
    assert sorted(groups) == [("dense", 512, 3)] * 2 + [("streaming:n_local=64,n_init=8", 512, 3)] * 2
    assert (tmp_path / "two.jsonl.log").read_text().count("--- dense at 512 tokens") == 2
    one = {(r["system"], r["task"], r["index"]): r["prediction"] for r in read_records(alone)}
    two = [(r["system"], r["task"], r["index"]) for r in read_records(together)]
    assert len(seen) == len(two) == len(set(two)) == 12  # every sample once
    assert {key: one[key] for key in two} == one  # and answered as one worker answers it
    # resuming with jobs works as without: only what is missing runs
    lines = together.read_text().splitlines(keepends=True)
    together.write_text("".join(lines[:-3]))
    seen.clear()
    assert run_eval(_plan(long_tiny, together, samples=3, jobs=2), seen.append) == []
    assert len(seen) == 3 and len(read_records(together)) == 12


def test_deal_gives_every_worker_every_task() -> None:
    from blockmem.eval.runner import deal

    tasks = ["a", "b", "c", "d"]  # an even count: dealing the list in turn gave one worker a and c only
    work = [(task, index) for index in range(4) for task in tasks]
    hands = deal(work, tasks, 2)
    assert [len(hand) for hand in hands] == [8, 8]
    assert all({task for task, _ in hand} == set(tasks) for hand in hands)
    assert all(hand == sorted(hand, key=work.index) for hand in hands)  # the runner's order kept
    assert sorted(sum(hands, [])) == sorted(work)  # every sample once
    # a resumed run with one task left alternates it between workers; no empty hands
    assert deal([("c", 5), ("c", 6), ("c", 7)], tasks, 2) == [[("c", 6)], [("c", 5), ("c", 7)]]
    assert deal([("b", 3)], tasks, 3) == [[("b", 3)]]


def _state(pid: int) -> str:
    """A process's state letter from /proc ('Z' zombie, '' gone)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return ""


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads process states from /proc")
def test_a_worker_stops_when_its_runner_is_killed() -> None:
    # runner stand-in: starts a worker stand-in that watches it, then waits; the test kills it outright
    worker = ("import time; from blockmem.eval.worker import exit_with_parent; exit_with_parent(0.05); "
              "print('ready', flush=True); time.sleep(120)")
    runner = (f"import subprocess, sys, time; p = subprocess.Popen([sys.executable, '-c', {worker!r}]); "
              "print(p.pid, flush=True); time.sleep(120)")
    parent = subprocess.Popen([sys.executable, "-c", runner], stdout=subprocess.PIPE, text=True)
    assert parent.stdout is not None
    pid = int(parent.stdout.readline())
    assert parent.stdout.readline().strip() == "ready"
    assert _state(pid) not in ("", "Z")
    parent.kill()
    parent.wait()
    deadline = time.monotonic() + 30
    while _state(pid) not in ("", "Z") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _state(pid) in ("", "Z"), "the orphaned worker kept running"


def _children(pid: int) -> list[int]:
    return [int(stat.parent.name) for stat in Path("/proc").glob("[0-9]*/stat")
            if _state(int(stat.parent.name)) and stat.read_text().rsplit(")", 1)[1].split()[1] == str(pid)]


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads process states from /proc")
def test_ctrl_c_stops_every_worker_of_a_jobs_run(long_tiny: Path, tmp_path: Path) -> None:
    import signal

    out = tmp_path / "r.jsonl"
    runner = subprocess.Popen([sys.executable, "-m", "blockmem.cli", "eval", "--model", str(long_tiny), "--tasks",
                               "passkey", "--lengths", "512", "--samples", "5000", "--methods", "dense",
                               "--threads", "1", "--jobs", "2", "-o", str(out)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,  # minutes of work
                              # a suite started in the background inherits SIGINT ignored: undo that
                              preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 120
        while (not out.exists() or not out.read_text()) and time.monotonic() < deadline:
            time.sleep(0.1)
        workers = _children(runner.pid)
        assert len(workers) == 2 and out.read_text(), "two workers answering"
        runner.send_signal(signal.SIGINT)
        assert runner.wait(timeout=30) != 0
    finally:
        runner.kill()
    deadline = time.monotonic() + 30
    while any(_state(pid) not in ("", "Z") for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert all(_state(pid) in ("", "Z") for pid in workers), "a worker kept running after Ctrl-C"
    records = out.read_text().splitlines()
    assert 0 < len(records) < 5000 and all(json.loads(line)["system"] == "dense" for line in records)


def test_one_writer_per_results_file(tmp_path: Path) -> None:
    from blockmem.eval.runner import results_file

    out = tmp_path / "r.jsonl"
    with results_file(out):
        with pytest.raises(ConfigError, match="another blockmem run is writing"):
            with results_file(out):
                pass


def test_refusals_and_worker_errors_are_recorded_not_fatal(long_tiny: Path, tmp_path: Path) -> None:
    from blockmem.eval.runner import read_records, run_eval

    out = tmp_path / "r.jsonl"
    failures = run_eval(_plan(long_tiny, out, lengths=[4096], tasks=["passkey"], samples=1))
    assert failures == []
    dense = [r for r in read_records(out) if r["system"] == "dense"]
    assert dense and "refused" in dense[0] and dense[0]["score"] is None  # past the 2K window
    broken = tmp_path / "broken-model"
    broken.mkdir()  # exists, so the plan accepts it, but the workers cannot load it
    failures = run_eval(_plan(broken, tmp_path / "r2.jsonl", tasks=["passkey"], samples=1))
    assert len(failures) == 2 and all("broken-model" in f for f in failures), failures
    assert read_records(tmp_path / "r2.jsonl") == []  # nothing half-done was recorded


def test_summary_and_ratio_tables_hand_checked() -> None:
    from blockmem.eval.report import ratio_table, summary_table

    records = [{"task": "passkey", "system": "a", "length": 4096, "score": s, "index": i} for i, s in
               enumerate([1.0, 0.0, 1.0, 1.0])]
    records += [{"task": "vt", "system": "a", "length": 4096, "score": 0.5, "index": 0},
                {"task": "passkey", "system": "b", "length": 4096, "score": None, "refused": "too long", "index": 0}]
    table = summary_table(records)
    assert "| passkey | 75.0 | refused |" in table
    assert "| vt | 50.0 | – |" in table
    assert "| **average** | **62.5** | – |" in table
    assert "says how many" not in table  # tasks may differ in samples; systems on one task do not
    bench = [{"bench": True, "system": "x", "length": 8192, "prefill_tok_s": p, "decode_tok_s": d, "ttft": 1.0,
              "peak_rss_mib": 100} for p, d in ((100, 10), (300, 30), (200, 20))]
    bench += [{"bench": True, "system": "base", "length": 8192, "prefill_tok_s": 50, "decode_tok_s": 40, "ttft": 2.0,
               "peak_rss_mib": 100}]
    ratios = ratio_table(bench, "base")
    assert "| x | 8K | 3 | 200.0 (100.0-300.0) | 4.00x |" in ratios and "| 20.0 (10.0-30.0) | 0.50x |" in ratios
    assert "| base | 8K | 1 | 50.0 | 1.00x |" in ratios
    other_run = ratio_table([{**bench[0], "run": "r1"}, {**bench[-1], "run": "r2"}], "base")
    assert "| r1 | x | 8K | 1 | 100.0 | – |" in other_run  # never a ratio against another run's baseline
    from blockmem.eval.report import by_model

    two = by_model([{**records[0], "model": "m1"}, {**records[0], "model": "m2"}])
    assert [r["system"] for r in two] == ["m1/a", "m2/a"]  # two models never merge into one row


def test_agreement_table_hand_checked() -> None:
    from blockmem.eval.report import agreement_table

    def rec(system: str, index: int, prediction: str, score: float | None, **extra: object) -> dict:
        return {"task": "passkey", "system": system, "length": 4096, "index": index, "seed": 0,
                "prediction": prediction, "score": score, **extra}

    records = [rec("dense", i, p, s) for i, (p, s) in enumerate([(" 123", 1.0), ("456", 0.0), ("789", 1.0)])]
    records += [rec("x", 0, "123 ", 1.0),  # the same answer (spaces aside)
                rec("x", 1, "4567", 1.0),  # another answer, scored higher
                rec("x", 2, "78", 0.0),  # another answer, scored lower
                rec("x", 3, "9", 1.0),  # dense has no sample 3: not compared
                rec("y", 0, "0", 0.0), rec("y", 1, "1", 0.0),  # another answer, the same score
                rec("y", 2, "", None, refused="too long")]  # refused: not compared
    table = agreement_table(records)
    assert "Against `dense`" in table
    assert "| x | 4K | 3 | 1 | 1 | 1 | 1 | 1 |" in table  # one up, one down: no evidence either way
    assert "| y | 4K | 2 | 0 | 1 | 0 | 1 | 1 |" in table
    assert agreement_table([r for r in records if r["system"] == "dense"]) == ""  # nothing to compare with
    from blockmem.eval.report import sign_test

    assert sign_test(0, 0) == 1.0 and sign_test(3, 3) == 1.0
    assert sign_test(0, 5) == pytest.approx(2 / 32)  # 5 of 5 one way: 2 * (1/2)^5
    assert sign_test(8, 2) == sign_test(2, 8) == pytest.approx(2 * (1 + 10 + 45) / 1024)
    other_seed = [rec("dense", 0, "1", 1.0), rec("x", 0, "1", 1.0, seed=1)]
    assert agreement_table(other_seed) == ""  # another seed is another prompt


def test_report_can_keep_the_first_samples_of_a_growing_file(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from blockmem.cli import app

    # "a" has run samples 0-3, "b" only 0-1 so far: --samples 2 compares both on the same prompts
    records = [{"task": "passkey", "system": "a", "length": 4096, "index": i, "score": s, "model": "m"}
               for i, s in enumerate([1.0, 1.0, 0.0, 0.0])]
    records += [{"task": "passkey", "system": "b", "length": 4096, "index": i, "score": 0.0, "model": "m"}
                for i in range(2)]
    path = tmp_path / "r.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    runner = CliRunner()
    done = runner.invoke(app, ["report", str(path), "--samples", "2", "--no-plots", "-o", str(tmp_path / "rep")])
    assert done.exit_code == 0, done.output
    assert "(2 samples per cell)" in done.stdout and "| passkey | 100.0 | 0.0 |" in done.stdout
    assert "first 2 of each task" in (tmp_path / "rep" / "report.md").read_text()
    everything = runner.invoke(app, ["report", str(path), "--no-plots", "-o", str(tmp_path / "all")])
    # without --samples the columns rest on different samples: the table says where
    assert "(2/4 samples per cell; a cell on fewer samples than its row's most says how many)" in everything.stdout
    assert "| passkey | 50.0 | 0.0 (n=2) |" in everything.stdout
    assert "| **average** | **50.0** | **0.0** (fewer samples) |" in everything.stdout
    refused = runner.invoke(app, ["report", str(path), "--samples", "0"])
    assert refused.exit_code == 2 and "--samples must be at least 1" in refused.output


def test_report_keeps_the_systems_asked_for_in_their_order(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from blockmem.cli import app

    labels = ["dense", "infllm:pooled_fraction=0.5,pooled_rows=null", "kvpress:knorm@0.5"]
    records = [{"task": "passkey", "system": label, "length": 4096, "index": 0, "score": score, "model": "m"}
               for label, score in zip(labels, [1.0, 0.0, 0.5])]
    path = tmp_path / "r.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    runner = CliRunner()
    picked = runner.invoke(app, ["report", str(path), "--no-plots", "-o", str(tmp_path / "rep"),
                                 "--systems", "kvpress:knorm@0.5,infllm:pooled_fraction=0.5,pooled_rows=null"])
    assert picked.exit_code == 0, picked.output
    assert "| task | kvpress:knorm@0.5 | infllm:pooled_fraction=0.5,pooled_rows=null |" in picked.stdout
    assert "| passkey | 50.0 | 0.0 |" in picked.stdout and "dense" not in picked.stdout.split("## Accuracy")[1]
    unknown = runner.invoke(app, ["report", str(path), "--no-plots", "-o", str(tmp_path / "x"), "--systems", "dense;quest"])
    assert unknown.exit_code == 2 and "no records of quest" in unknown.output and "kvpress:knorm@0.5" in unknown.output


def test_eval_then_report_end_to_end(long_tiny: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from blockmem.cli import app

    out = tmp_path / "results.jsonl"
    runner = CliRunner()
    done = runner.invoke(app, ["eval", "--model", str(long_tiny), "--tasks", "niah_single_1,passkey,perplexity",
                               "--lengths", "512", "--samples", "2", "--methods", "dense,streaming:n_local=64",
                               "--peers", "transformers", "--threads", "1", "-o", str(out)])
    assert done.exit_code == 0, done.output
    assert "| passkey |" in done.stdout and "transformers" in done.stdout
    # stderr is not a terminal here: progress comes as lines, the last one closing the run
    assert "transformers @ 512: 18/18 samples (100%)" in done.stderr
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(records) == 3 * 3 * 2
    by = {(r["system"], r["task"], r["index"]): r for r in records}
    # the transformers peer reads the same token ids as blockmem dense and answers the same (greedy)
    for task in ("niah_single_1", "passkey"):
        for index in range(2):
            assert by[("transformers", task, index)]["tokens"] == by[("dense", task, index)]["tokens"]
            assert by[("transformers", task, index)]["prediction"] == by[("dense", task, index)]["prediction"]
            # and its decode steps read as many keys, counted the same way
            assert by[("transformers", task, index)]["tokens_attended"] == \
                by[("dense", task, index)]["tokens_attended"]
    assert by[("transformers", "perplexity", 0)]["loss"] == pytest.approx(by[("dense", "perplexity", 0)]["loss"],
                                                                          abs=1e-3)
    report = tmp_path / "report"
    done = runner.invoke(app, ["report", str(out), "-o", str(report)])
    assert done.exit_code == 0, done.output
    markdown = (report / "report.md").read_text()
    assert "## Accuracy" in markdown and "## Perplexity by position" in markdown and "| transformers |" in markdown
    # sample by sample, transformers answers as blockmem dense (the needle tasks' 4 samples)
    assert "| transformers | 512 | 4 | 4 | 4 | 0 | 0 | 1 |" in markdown
    for name in ("heatmap.png", "accuracy_vs_length.png", "decode_vs_length.png", "memory_vs_length.png",
                 "perplexity.png"):
        data = (report / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000, name
        assert f"({name})" in markdown


def test_eval_bad_input_is_one_clear_line(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from blockmem.cli import app

    runner = CliRunner()
    for args, message in ((["--tasks", "nope"], "unknown task"), (["--lengths", "4q"], "not a list of token counts"),
                          (["--lengths", "100"], "at least 256"), (["--samples", "0"], "at least 1"),
                          (["--depths", "2"], "between 0 and 1"), (["--peers", "vllm"], "unknown peer"),
                          (["--jobs", "0"], "--jobs must be at least 1"),
                          (["--model", str(tmp_path / "none.gguf")], "model not found"),
                          (["--qa-squad", str(tmp_path / "none.json")], "QA file not found")):
        done = runner.invoke(app, ["eval", *args, "-o", str(tmp_path / "r.jsonl")])
        assert done.exit_code == 2 and message in done.output, (args, done.output)
    done = runner.invoke(app, ["report", str(tmp_path / "none.jsonl")])
    assert done.exit_code == 2 and "results file not found" in done.output
    done = runner.invoke(app, ["bench", "--baseline", "nobody", "--methods", "dense", "--peers", ""])
    assert done.exit_code == 2 and "baseline" in done.output


def test_bench_measures_and_prints_ratios(long_tiny: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from blockmem.cli import app

    out = tmp_path / "bench.jsonl"
    infllm = "infllm:block_size=16,topk=4,n_local=64,n_init=8"
    done = CliRunner().invoke(app, ["bench", "--model", str(long_tiny), "--lengths", "512,4k", "--methods",
                                    f"dense,streaming:n_local=64,{infllm}", "--peers", "", "--baseline", "dense",
                                    "--reps", "1", "--new-tokens", "4", "--threads", "1", "--ram-budget", "1MB",
                                    "-o", str(out)])
    assert done.exit_code == 0, done.output
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(records) == 6 and all(r["bench"] for r in records)
    measured = {(r["system"], r["length"]): r for r in records}
    # 4K tokens of tiny-model blocks (~3 MB) under a 1 MB RAM budget: blocks come back from disk
    assert measured[(infllm, 4096)]["bytes_moved_per_token"] > 0
    assert measured[("dense", 512)]["decode_tok_s"] > 0 and "refused" in measured[("dense", 4096)]
    assert measured[("streaming:n_local=64", 4096)]["tokens_attended"] < 500  # of a 4060-token prompt
    assert "1.00x" in done.stdout and "refused" in done.stdout


def test_bench_plots_take_each_point_from_its_latest_run() -> None:
    from blockmem.eval.plots import _by_length

    def bench(run: str, system: str, length: int, speed: float) -> dict:
        return {"bench": True, "run": run, "system": system, "length": length, "decode_tok_s": speed}

    records = [bench("old", "infllm", 8192, 10.0), bench("old", "infllm", 8192, 12.0),
               bench("old", "infllm", 32768, 18.0), bench("new", "infllm", 32768, 29.0),
               bench("new", "infllm", 32768, 31.0), bench("old", "llamacpp", 32768, 9.0)]
    series = _by_length(records, "decode_tok_s")
    assert sorted(series["infllm"]) == [(8192, 11.0), (32768, 30.0)]  # 32K: the new run only, not 29 (blended)
    assert series["llamacpp"] == [(32768, 9.0)]


def test_long_system_labels_wrap_after_commas_in_plot_titles() -> None:
    from blockmem.eval.plots import wrap_label

    label = "blocksparse:position=infllm,exec_size=16,switch_length=0"
    lines = wrap_label(label).split("\n")
    assert lines == ["blocksparse:position=infllm,", "exec_size=16,switch_length=0"]
    assert "".join(lines) == label and wrap_label("infllm") == "infllm"


def test_plot_lines_look_different_past_ten_series() -> None:
    """matplotlib's cycle has ten colours; the eleventh system of a bench report used to share the
    first one's colour and marker."""
    from blockmem.eval.plots import line_style

    looks = {tuple(sorted(line_style(index).items())) for index in range(30)}
    assert len(looks) == 30
    assert line_style(10)["color"] == line_style(0)["color"] and line_style(10)["marker"] != line_style(0)["marker"]
