"""The `blockmem` command on a tiny model: output shapes, flags, help, errors."""

from __future__ import annotations

import json
import re

import pytest
import typer
from typer.testing import CliRunner

from blockmem.cli import app

COMMANDS = ["run", "chat", "models"]


@pytest.fixture(scope="module")
def model_dir(tiny) -> str:
    return str(tiny.get("llama")[0])


def invoke(args: list[str], stdin: str | None = None):
    return CliRunner().invoke(app, args, input=stdin)


def test_run_streams_answer_and_one_line_summary(model_dir) -> None:
    result = invoke(["run", "-m", model_dir, "-n", "8", "--threads", "1", "hello there"])
    assert result.exit_code == 0, result.output
    assert result.stdout.strip()  # the answer (a random model's text)
    summary = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(summary) == 1
    assert re.search(r"prompt \d+ tok \| prefill [\d.]+ tok/s \| TTFT [\d.]+ s \| decode [\d.]+ tok/s .* \| "
                     r"peak RSS \d+ MiB", summary[0])


def test_run_json(model_dir) -> None:
    result = invoke(["run", "-m", model_dir, "-n", "5", "--json", "--raw", "hello"])
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout)
    assert set(record) >= {"model", "text", "finish_reason", "tokens", "stats", "method"}
    stats = record["stats"]
    for key in ("prompt_tokens", "prefill_tokens_per_second", "time_to_first_token", "decode_tokens_per_second",
                "peak_rss_bytes"):
        assert key in stats
    assert record["method"]["method"] == "dense" and record["tokens"] <= 5
    from blockmem.attention import kernels

    assert record["decode_kernel"] == ("native" if kernels.available() else f"torch ({kernels.unavailable_reason()})")


def test_run_says_when_decode_attention_falls_back_to_torch(model_dir, monkeypatch) -> None:
    from blockmem.attention import kernels

    monkeypatch.setattr(kernels, "available", lambda: False)
    monkeypatch.setattr(kernels, "unavailable_reason", lambda: "no C compiler (cc) on PATH")
    result = invoke(["run", "-m", model_dir, "-n", "2", "--raw", "hello"])
    assert result.exit_code == 0, result.output
    assert "decode attention: torch (no C compiler (cc) on PATH)" in result.stderr


def test_document_question_and_stdin(model_dir, tmp_path) -> None:
    import blockmem

    doc = tmp_path / "doc.txt"
    doc.write_text("The passkey is 12345.")
    result = invoke(["run", "-m", model_dir, "-n", "2", "--json", "-f", str(doc), "-q", "What is the passkey?"])
    engine = blockmem.Engine(blockmem.load(model_dir, device="cpu"))
    expected = engine.encode(messages=[{"role": "user", "content": "The passkey is 12345.\n\nWhat is the passkey?"}])
    assert json.loads(result.stdout)["stats"]["prompt_tokens"] == len(expected)
    raw = invoke(["run", "-m", model_dir, "-n", "2", "--json", "--raw", "-f", str(doc), "-q", "Passkey?"])
    expected_raw = engine.encode("The passkey is 12345.\n\nQuestion: Passkey?\nAnswer:", raw=True)
    assert json.loads(raw.stdout)["stats"]["prompt_tokens"] == len(expected_raw)
    piped = invoke(["run", "-m", model_dir, "-n", "2", "--json", "--raw"], stdin="from stdin")
    assert json.loads(piped.stdout)["stats"]["prompt_tokens"] == len(engine.encode("from stdin", raw=True))


@pytest.mark.parametrize("args,message", [
    (["run", "-f", "/no/such/doc.txt", "-q", "x"], "document not found"),
    (["run", "--threads", "0", "hi"], "--threads must be at least 1"),
    (["run", "--top-p", "0", "hi"], "top_p must be in (0, 1]"),
    (["run", "--dtype", "int3", "hi"], "unknown dtype"),
    (["run", "--method", "magic", "hi"], "unknown attention method"),
    (["run"], "nothing to answer"),
])
def test_bad_input_is_one_clear_line(model_dir, args, message) -> None:
    result = invoke([*args[:1], "-m", model_dir, *args[1:]], stdin="")
    assert result.exit_code == 2
    assert "Traceback" not in result.output
    assert result.stderr.startswith("error: ") and message in result.stderr


def test_messages_and_help_print_brackets_literally(model_dir) -> None:
    """Paths and fixes hold brackets (`notes[1].txt`, `pip install "blockmem[peers]"`): rich markup
    must neither eat them nor crash on one that looks like a closing tag."""
    result = invoke(["run", "-m", model_dir, "-f", "/no/such/[draft] notes[/b].txt", "-q", "x"])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "/no/such/[draft] notes[/b].txt" in result.stderr
    command, checked = typer.main.get_command(app), 0
    for name, sub in command.commands.items():
        for param in getattr(sub, "params", []):
            text = (getattr(param, "help", None) or "").replace("\\[", "[")  # as written, markup escapes undone
            for word in re.findall(r"\w\[\w+\]", text):
                checked += 1
                shown = CliRunner().invoke(app, [name, "--help"], env={"COLUMNS": "400"}).output
                assert word in shown, f"{name} --help lost {word!r} of {param.name}"
    assert checked  # eval's --peers names "blockmem[peers]"


def test_chat_session(model_dir) -> None:
    result = invoke(["chat", "-m", model_dir, "-n", "4"], stdin="hello\n/reset\nagain\n/exit\n")
    assert result.exit_code == 0, result.output
    assert result.stderr.count("prompt ") == 2  # one stats line per answered turn


def test_every_flag_has_help() -> None:
    command = typer.main.get_command(app)
    memory = command.commands["memory"]
    subs = [([name], command.commands[name]) for name in COMMANDS]
    subs += [(["memory", name], memory.commands[name]) for name in ("build", "extend", "info", "verify")]
    for path, sub in subs:
        assert sub.help
        for param in sub.params:
            if param.param_type_name in ("option", "argument") and param.name != "help":
                assert getattr(param, "help", None), f"{path} {param.name} has no help"
        result = invoke([*path, "--help"])
        assert result.exit_code == 0 and "Usage" in result.output


MEMORY_OPTIONS = ["--block-size", "8", "--n-init", "4", "--n-local", "16", "--topk", "2", "--chunk-size", "32"]


def test_memory_build_info_run_extend_verify(model_dir, tmp_path) -> None:
    doc, more = tmp_path / "doc.txt", tmp_path / "more.txt"
    doc.write_text("The quick brown fox jumps over the lazy dog. " * 20)
    more.write_text("Paris is the capital of France. " * 10)
    path = str(tmp_path / "doc.bmem")
    built = invoke(["memory", "build", str(doc), "-o", path, "-m", model_dir, *MEMORY_OPTIONS])
    assert built.exit_code == 0, built.output
    assert re.search(r"doc.bmem: \d+ tokens in 1 document\(s\), \d+ blocks", built.stderr)
    info = json.loads(invoke(["memory", "info", path, "--json"]).stdout)
    assert info["method"]["name"] == "infllm" and info["method"]["options"]["topk"] == 2
    assert info["documents"][0]["name"] == "doc.txt" and info["blocks"] > 0
    assert "tokens    " in invoke(["memory", "info", path]).stdout
    asked = invoke(["run", "--memory", path, "-m", model_dir, "-n", "3", "--json", "--ram-budget", "64KB",
                    "--spill-dir", str(tmp_path), "Where is the fox?"])
    assert asked.exit_code == 0, asked.output
    record = json.loads(asked.stdout)
    assert record["memory"] == path and record["stats"]["memory_tokens"] == info["tokens"]
    assert record["stats"]["tiers"]["ram"]["budget_bytes"] == 64000
    text = invoke(["run", "--memory", path, "-m", model_dir, "-n", "3", "Where is the fox?"])
    assert text.exit_code == 0 and "memory " in text.stderr and "tiers:" in text.stderr
    extended = invoke(["memory", "extend", path, str(more), "-m", model_dir])
    assert extended.exit_code == 0, extended.output
    assert json.loads(invoke(["memory", "info", path, "--json"]).stdout)["tokens"] > info["tokens"]
    verified = invoke(["memory", "verify", path, "-m", model_dir])
    assert verified.exit_code == 0 and verified.stdout.startswith("ok: ")


@pytest.mark.parametrize("args,message", [
    (["memory", "build", "{doc}", "-o", "{path}"], "exists"),
    (["memory", "build", "{doc}", "-o", "{dir}/x.txt"], "name the memory NAME.bmem"),
    (["memory", "build", "{dir}/none.txt", "-o", "{dir}/n.bmem"], "document not found"),
    (["memory", "info", "{dir}/none.bmem"], "memory not found"),
    (["memory", "verify", "{doc}"], "not a blockmem memory file"),
    (["run", "--memory", "{doc}", "q"], "fix: pass a .bmem file written by `blockmem memory build`"),
    (["run", "--memory", "{path}", "--method", "quest", "q"], "built with --method infllm, not quest"),
    (["run", "--memory", "{path}", "--topk", "5", "q"], "built with --topk 2, not 5"),
    (["run", "--memory", "{path}", "-f", "{doc}", "q"], "--file and --memory do not mix"),
    (["run", "--memory", "{path}", "--ram-budget", "lots", "q"], "cannot read 'lots' as a size"),
    (["run", "--memory", "{path}", "--ram-budget", "1KB", "q"], "smaller than one block"),
    (["run", "--memory", "{path}", "--dtype", "bfloat16", "q"], "--dtype float32"),
    (["run", "--method", "dense", "--ram-budget", "1GB", "q"], "budgets apply to block-memory methods"),
    (["run", "--spill-dir", "{dir}", "q"], "--spill-dir needs --ram-budget"),
])
def test_memory_bad_input_is_one_clear_line(model_dir, tmp_path, args, message) -> None:
    doc = tmp_path / "doc.txt"
    doc.write_text("Some text to remember. " * 20)
    path = tmp_path / "m.bmem"
    assert invoke(["memory", "build", str(doc), "-o", str(path), "-m", model_dir, *MEMORY_OPTIONS]).exit_code == 0
    args = [a.format(doc=doc, path=path, dir=tmp_path) for a in args]
    result = invoke([*args, "-m", model_dir] if args[0] != "memory" or args[1] != "info" else args)
    if args[:2] == ["memory", "verify"]:
        result = invoke(args)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert result.stderr.startswith("error: ") and message in result.stderr


def test_models_lists_catalog() -> None:
    result = invoke(["models"])
    assert result.exit_code == 0
    assert "smollm2-135m" in result.stderr and "gemma3-270m" in result.stderr


def test_method_options_reach_the_method_and_foreign_ones_are_refused(model_dir) -> None:
    result = invoke(["run", "-m", model_dir, "-n", "2", "--json", "--raw", "--method", "infllm", "--block-size", "8",
                     "--topk", "2", "--n-init", "4", "--n-local", "16", "--exec-size", "16", "--position", "compacted",
                     "--last-alone", "--pooled-fraction", "0.5", "--pooled-rows", "16", "--pooled-hold",
                     "hello " * 40])
    assert result.exit_code == 0, result.output
    settings = json.loads(result.stdout)["method"]
    assert (settings["method"], settings["block_size"], settings["topk"], settings["exec_size"]) == ("infllm", 8, 2, 16)
    assert settings["position"] == "compacted" and settings["effective_budget"] == 4 + 16 + 2 * 8
    assert settings["last_alone"] is True and settings["pooled_fraction"] == 0.5 and settings["pooled_rows"] == 16
    assert settings["pooled_hold"] is True
    refused = invoke(["run", "-m", model_dir, "--method", "dense", "--exec-size", "16", "hi"])
    assert refused.exit_code == 2 and "--exec-size does not apply to the dense method" in refused.stderr
    idle = invoke(["run", "-m", model_dir, "--method", "infllm", "--pooled-fraction", "0", "--pooled-rows", "8", "hi"])
    assert idle.exit_code == 2 and "--pooled-rows shapes the blocks chosen by pooled keys" in idle.stderr
    both = invoke(["run", "-m", model_dir, "--method", "infllm", "--pooled-fraction", "0", "--pooled-rows", "8",
                   "--pooled-hold", "hi"])
    assert both.exit_code == 2 and "--pooled-rows and --pooled-hold shape the blocks" in both.stderr
