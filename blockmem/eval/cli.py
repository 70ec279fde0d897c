"""The `blockmem eval`, `blockmem bench` and `blockmem report` commands (registered on the main app)."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from blockmem.errors import ConfigError
from blockmem.progress import progress_bar

Model = Annotated[str | None, typer.Option("--model", "-m", help="Catalog name (smollm2-135m, gemma3-270m), a .gguf "
                                           "file or a Hugging Face model directory. Default: smollm2-135m.")]
Lengths = Annotated[str, typer.Option(help="Context lengths in the model's tokens, e.g. 4k,8k,16k (prompt + answer "
                                      "fit in each).")]
Methods = Annotated[str, typer.Option(help="blockmem methods, comma-separated, each with optional options: "
                                      "dense,infllm,streaming or dense,infllm:topk=8,n_local=1024,streaming "
                                      "(name=value items belong to the method before them; ';' also separates methods: "
                                      "'dense;infllm:topk=8,n_local=1024').")]
Peers = Annotated[str | None, typer.Option(help="Peers on the same weights and prompts: transformers, llamacpp, "
                                           "kvpress (= kvpress:streaming,kvpress:snapkv,kvpress:knorm) or "
                                           "kvpress:PRESS@RATIO. Needs pip install \"blockmem\\[peers]\".")]
Threads = Annotated[int | None, typer.Option(help="CPU threads for every system (default: torch's choice).")]
Dtype = Annotated[str, typer.Option(help="blockmem's compute dtype: float32, bfloat16 or float16.")]
Device = Annotated[str, typer.Option(help="blockmem's device: cpu, cuda, auto.")]
RamBudget = Annotated[str | None, typer.Option(help="Memory tiers for blockmem's block-memory methods: bytes of "
                                               "blocks kept in RAM (e.g. 256MB), the rest spills to disk; bytes "
                                               "moved per token are then recorded. Default: all in RAM.")]


def register(app: typer.Typer) -> None:
    app.command("eval")(eval_command)
    app.command("bench")(bench_command)
    app.command("report")(report_command)


def _friendly(fn):  # noqa: ANN001, ANN202
    from blockmem.cli import _friendly as friendly

    return friendly(fn)


def eval_command(
    tasks: Annotated[str, typer.Option(help="Tasks or groups, comma-separated: ruler (8 needle tasks, vt, cwe, fwe; "
                                       "QA too when its files are given), niah, passkey, perplexity, all, or task "
                                       "names (niah_single_1, ..., qa_squad, qa_hotpot).")] = "ruler",
    lengths: Lengths = "4k",
    methods: Methods = "dense,infllm",
    peers: Peers = None,
    samples: Annotated[int, typer.Option(help="Samples per task and length.")] = 10,
    seed: Annotated[int, typer.Option(help="Seed: the same seed gives the same prompts.")] = 0,
    depths: Annotated[str, typer.Option(help="Needle depths (0 = start, 1 = end) the samples cycle through.")]
    = "0,0.25,0.5,0.75,1",
    out: Annotated[Path, typer.Option("--out", "-o", help="Results file (JSONL). Records are appended; a run "
                                      "continues where an earlier one with the same file stopped.")]
    = Path("blockmem-eval.jsonl"),
    model: Model = None,
    dtype: Dtype = "float32",
    device: Device = "cpu",
    threads: Threads = None,
    jobs: Annotated[int, typer.Option("--jobs", "-j", help="Worker processes at once, each system's samples dealt "
                                      "among them (on N cores, --jobs N --threads 1 keeps each core on a sample of "
                                      "its own; latencies then include the sharing).")] = 1,
    chunk_size: Annotated[int, typer.Option(help="blockmem prefill chunk in tokens.")] = 1024,
    kv_ratio: Annotated[float, typer.Option(help="kvpress: share of the context's KV cache dropped.")] = 0.5,
    kvpress_python: Annotated[str | None, typer.Option(help="Python of an environment with kvpress (it needs an "
                                                       "older transformers); default: $BLOCKMEM_KVPRESS_PYTHON or "
                                                       "this Python.")] = None,
    qa_squad: Annotated[Path | None, typer.Option(help="SQuAD dev JSON: adds qa_squad to ruler.")] = None,
    qa_hotpot: Annotated[Path | None, typer.Option(help="HotpotQA dev JSON: adds qa_hotpot to ruler.")] = None,
    ram_budget: RamBudget = None,
) -> None:
    """Score methods and peers on RULER-style tasks, passkey and perplexity, one JSONL record per sample.

    Example: blockmem eval --tasks ruler --lengths 4k,8k --methods dense,infllm,streaming
    --peers transformers,llamacpp --samples 20 -o results.jsonl && blockmem report results.jsonl
    """
    _friendly(_eval)(**locals())  # every option by name (keyword-only: a renamed option fails loudly)


def _lengths(text: str) -> list[int]:
    from blockmem.eval.passkey import parse_length

    try:
        values = [parse_length(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"--lengths {text!r} is not a list of token counts", "e.g. --lengths 4k,8k,16k") from None
    if not values or min(values) < 256:
        raise ConfigError(f"--lengths {text!r}: each length must be at least 256 tokens", "e.g. --lengths 4k,8k")
    return values


def _budget(text: str | None) -> str | None:
    from blockmem.memory.tiers import parse_size

    parse_size(text, "--ram-budget")  # a bad size fails here, not in a worker
    return text


def _eval(*, tasks: str, lengths: str, methods: str, peers: str | None, samples: int, seed: int, depths: str,
          out: Path, model: str | None, dtype: str, device: str, threads: int | None, jobs: int, chunk_size: int,
          kv_ratio: float, kvpress_python: str | None, qa_squad: Path | None, qa_hotpot: Path | None,
          ram_budget: str | None) -> None:
    from blockmem.cli import err
    from blockmem.eval.report import length_label, summary_table
    from blockmem.eval.runner import EvalPlan, read_records, run_eval
    from blockmem.eval.systems import parse_systems
    from blockmem.eval.tasks import TaskOptions, resolve_tasks
    from blockmem.model.loader import resolve

    try:
        depth_values = [float(x) for x in depths.split(",") if x.strip()]
    except ValueError:
        depth_values = []
    if not depth_values or not all(0.0 <= d <= 1.0 for d in depth_values):
        raise ConfigError(f"--depths {depths!r} must be numbers between 0 and 1", "e.g. --depths 0,0.5,1")
    for path in (qa_squad, qa_hotpot):
        if path is not None and not path.is_file():
            raise ConfigError(f"QA file not found: {path}", "pass the dev-set JSON file you have")
    options = TaskOptions(depths=depth_values, squad=str(qa_squad) if qa_squad else None,
                          hotpot=str(qa_hotpot) if qa_hotpot else None)
    resolve(model)  # a missing model fails here, not in a worker
    plan = EvalPlan(model, resolve_tasks(tasks, options), _lengths(lengths), parse_systems(methods, peers, kv_ratio),
                    samples, out, seed, dtype, device, threads, chunk_size, options,
                    kvpress_python or os.environ.get("BLOCKMEM_KVPRESS_PYTHON"), _budget(ram_budget), jobs)
    total = len(plan.tasks) * len(plan.lengths) * len(plan.systems) * samples
    progress = progress_bar(err, "samples")
    bar = progress.add_task("eval", total=total)
    with progress:
        def on_plan(to_run: int) -> None:  # samples already in the file count as done
            progress.update(bar, completed=total - to_run)

        def on_group(system: str, length: int, count: int) -> None:
            progress.update(bar, description=f"{escape(system)} @ {length_label(length)}")

        failures = run_eval(plan, lambda record: progress.advance(bar), on_group, on_plan)
    records = [r for r in read_records(out) if r.get("model") == plan.model_name() and r.get("seed") == seed]
    sys.stdout.write(summary_table(records) + "\n")
    err.print(escape(f"results: {out} (blockmem report {out} --out DIR: tables and plots)"))
    for failure in failures:
        err.print(f"[red]failed:[/red] {escape(str(failure))}")
    if failures:
        raise typer.Exit(1)


def bench_command(
    lengths: Lengths = "8k,16k,32k",
    methods: Methods = "infllm,blocksparse,dense",
    peers: Peers = "transformers,llamacpp",
    baseline: Annotated[str, typer.Option(help="Ratios are against this system, measured in the same run.")]
    = "llamacpp",
    new_tokens: Annotated[int, typer.Option(help="Tokens decoded per run.")] = 32,
    reps: Annotated[int, typer.Option(help="Repetitions per system and length; medians are reported.")] = 3,
    out: Annotated[Path, typer.Option("--out", "-o", help="Results file (JSONL, appended).")]
    = Path("blockmem-bench.jsonl"),
    model: Model = None,
    dtype: Dtype = "float32",
    device: Device = "cpu",
    threads: Threads = None,
    ram_budget: RamBudget = None,
) -> None:
    """Time methods and peers by context length, with ratios against a baseline from the same run.

    Measures prefill tok/s, TTFT, decode tok/s, peak RSS, tokens read and bytes moved per token.
    Every (system, length, repetition) runs in a fresh process, and the systems alternate within
    each repetition so that machine drift hits all of them.
    """
    _friendly(_bench)(**locals())  # every option by name, as for eval


def _bench(*, lengths: str, methods: str, peers: str | None, baseline: str, new_tokens: int, reps: int, out: Path,
           model: str | None, dtype: str, device: str, threads: int | None, ram_budget: str | None) -> None:
    from blockmem.cli import err
    from blockmem.eval.bench import BenchPlan, run_bench
    from blockmem.eval.report import ratio_table
    from blockmem.eval.runner import read_records
    from blockmem.eval.systems import parse_systems
    from blockmem.model.loader import resolve

    if reps < 1 or new_tokens < 2:
        raise ConfigError(f"--reps must be >= 1 and --new-tokens >= 2, got {reps} and {new_tokens}",
                          "decode speed needs at least two new tokens; e.g. --reps 2 --new-tokens 32")
    systems = parse_systems(methods, peers)
    if any(s.kind == "kvpress" for s in systems):
        raise ConfigError("bench times blockmem, transformers and llamacpp; kvpress is compared by accuracy in "
                          "`blockmem eval`", "drop kvpress from --peers")
    if baseline not in [s.label for s in systems]:
        raise ConfigError(f"the baseline {baseline!r} is not among the systems", "name it in --methods or --peers")
    resolve(model)
    plan = BenchPlan(model, _lengths(lengths), systems, reps, new_tokens, out, dtype, device, threads,
                     _budget(ram_budget))
    progress = progress_bar(err, "runs")
    bar = progress.add_task("bench", total=len(plan.lengths) * len(systems) * reps)
    with progress:
        run_id = run_bench(plan, lambda label: progress.update(bar, description=escape(label)),
                           lambda record: progress.advance(bar))
    records = [r for r in read_records(out) if r.get("run") == run_id]
    sys.stdout.write(ratio_table(records, baseline) + "\n")
    err.print(escape(f"results: {out}"))


def report_command(
    results: Annotated[list[Path], typer.Argument(help="Results files of blockmem eval and/or blockmem bench.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for report.md and the PNG plots.")]
    = Path("blockmem-report"),
    baseline: Annotated[str, typer.Option(help="bench: ratios against this system.")] = "llamacpp",
    plots: Annotated[bool, typer.Option("--plots/--no-plots", help="Draw PNG plots (needs matplotlib).")] = True,
    samples: Annotated[int | None, typer.Option(help="eval: report only samples 0..N-1 of each task and length, so "
                                                "every system is scored on the same prompts while a file grows "
                                                "(default: all).")] = None,
    systems: Annotated[str | None, typer.Option(help="Only these systems, in this order, labelled as in the results: "
                                                "'dense;infllm;transformers' (';' or ',' between them, as for "
                                                "eval --methods). Default: every system.")] = None,
) -> None:
    """Markdown tables and PNG plots from eval and bench results files.

    Tables per task and length; plots: accuracy heatmap (length x depth), accuracy vs length,
    decode speed and peak memory vs length, perplexity by position."""
    _friendly(_report)(results, out, baseline, plots, samples, systems)


def _report(results: list[Path], out: Path, baseline: str, plots: bool, samples: int | None,
            systems: str | None = None) -> None:
    from blockmem.cli import err
    from blockmem.eval.report import first_samples, write_report
    from blockmem.eval.runner import read_records
    from blockmem.eval.systems import split_methods

    if samples is not None and samples < 1:
        raise ConfigError(f"--samples must be at least 1, got {samples}", "leave it out to report every sample")
    records = []
    for path in results:
        if not path.is_file():
            raise ConfigError(f"results file not found: {path}", "pass files written by blockmem eval or bench")
        records += read_records(path)
    if not first_samples(records, samples):
        raise ConfigError("the results files hold no records", "run blockmem eval or blockmem bench first")
    markdown, files = write_report(records, out, baseline, plots, sources=[str(p) for p in results],
                                   samples=samples, systems=split_methods(systems) if systems else None)
    sys.stdout.write(markdown + "\n")
    err.print(escape(f"wrote {', '.join(str(f) for f in files)}"))
