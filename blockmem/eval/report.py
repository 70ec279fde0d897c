"""Tables and plots from `blockmem eval` and `blockmem bench` records.

Tables (markdown): accuracy per task, length and system (mean score x 100 over the samples, with
the sample count where it differs); a RULER average per length; agreement with the first system,
sample by sample (same answer, same score, scored higher or lower); perplexity by position bucket;
cost per system and length from the eval records (latency, decode tok/s, tokens read per step,
peak RSS); and the bench ratio table.
Plots (PNG, matplotlib): accuracy heatmap (length x depth) per system, accuracy vs length,
decode tok/s and peak RSS vs length, perplexity by position.
"""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from blockmem.errors import ConfigError

Record = dict[str, Any]


def length_label(length: int) -> str:
    """A length as tables, plots and progress lines show it: 8192 -> '8K', 1536 -> '1536', 0 -> '0'."""
    return f"{length // 1024}K" if length and length % 1024 == 0 else str(length)


def unique_in_order(values: Iterable[Any]) -> list[Any]:
    """The distinct values in order of first appearance (systems, tasks, buckets)."""
    return list(dict.fromkeys(values))


def eval_records(records: list[Record]) -> list[Record]:
    return [r for r in records if "task" in r and not r.get("bench")]


def bench_records(records: list[Record]) -> list[Record]:
    return [r for r in records if r.get("bench")]


def first_samples(records: list[Record], samples: int | None) -> list[Record]:
    """Eval records of samples 0..samples-1 only (bench records as they are): a results file grown
    in steps (4, then 8, ... samples per task) is then reported on the same prompts for every
    system, even while a later step is part-way through."""
    if samples is None:
        return records
    return [r for r in records if "task" not in r or r.get("bench") or r["index"] < samples]


def select_systems(records: list[Record], systems: list[str] | None) -> list[Record]:
    """Records of `systems` only, the systems in that order (tables and legends follow the order in
    which systems first appear); a label no record has is an error that lists those that are."""
    if not systems:
        return records
    known = unique_in_order(r["system"] for r in records if "system" in r)
    missing = [s for s in systems if s not in known]
    if missing:
        raise ConfigError(f"no records of {', '.join(missing)} in the results",
                          f"--systems takes labels as written in the results: {'; '.join(known)}")
    rank = {system: index for index, system in enumerate(systems)}
    return sorted((r for r in records if r.get("system") in rank), key=lambda r: rank[r["system"]])


def by_model(records: list[Record]) -> list[Record]:
    """Records of several models side by side: their systems become MODEL/SYSTEM."""
    if len({r.get("model") for r in records}) < 2:
        return records
    return [{**r, "system": f"{r.get('model')}/{r['system']}"} for r in records]


def accuracy(records: list[Record]) -> dict[tuple[str, str, int], tuple[float | None, int, bool]]:
    """(system, task, length) -> (mean score, samples, refused)."""
    groups: dict[tuple[str, str, int], list[Record]] = defaultdict(list)
    for r in records:
        if r["task"] != "perplexity":
            groups[(r["system"], r["task"], r["length"])].append(r)
    out = {}
    for key, group in groups.items():
        scores = [r["score"] for r in group if r.get("score") is not None]
        out[key] = (statistics.fmean(scores) if scores else None, len(group), any("refused" in r for r in group))
    return out


def summary_table(records: list[Record]) -> str:
    """Accuracy (x 100) per task and system, one table per length, with the RULER average."""
    records = eval_records(records)
    if not records:
        return "(no eval records)"
    table = accuracy(records)
    systems = unique_in_order(r["system"] for r in records)
    tasks = unique_in_order(r["task"] for r in records if r["task"] != "perplexity")
    lines: list[str] = []
    for length in sorted({r["length"] for r in records}):
        if not any(key[2] == length for key in table):
            continue
        counts = {n for (_, _, n_length), (_, n, _) in table.items() if n_length == length}
        per_cell = "/".join(str(c) for c in sorted(counts))
        # a score on fewer samples of a task than another system's is marked, in its cell and average
        scored = {(system, task): table[(system, task, length)][1] for system in systems for task in tasks
                  if table.get((system, task, length), (None,))[0] is not None}
        most = {task: max((n for (_, t), n in scored.items() if t == task), default=0) for task in tasks}
        fewer = {(system, task) for (system, task), n in scored.items() if n < most[task]}
        note = "; a cell on fewer samples than its row's most says how many" if fewer else ""
        lines += [f"### {length_label(length)} tokens ({per_cell} samples per cell{note})", "",
                  "| task | " + " | ".join(systems) + " |", "|---|" + "---:|" * len(systems)]
        for task in tasks:
            cells = []
            for system in systems:
                mean, n, refused = table.get((system, task, length), (None, 0, False))
                cell = "refused" if refused and mean is None else "–" if mean is None else f"{100 * mean:.1f}"
                cells.append(f"{cell} (n={n})" if (system, task) in fewer else cell)
            lines.append(f"| {task} | " + " | ".join(cells) + " |")
        averages = []
        for system in systems:
            means = [table[(system, t, length)][0] for t in tasks if (system, t, length) in table]
            if not means or None in means:
                averages.append("–")
            else:  # an average over fewer tasks or samples than the others is marked, not compared silently
                partial = f" ({len(means)}/{len(tasks)} tasks)" if len(means) < len(tasks) else ""
                partial += " (fewer samples)" if any((system, t) in fewer for t in tasks) else ""
                averages.append(f"**{100 * statistics.fmean(means):.1f}**{partial}")
        lines += [f"| **average** | " + " | ".join(averages) + " |", ""]
    return "\n".join(lines).rstrip()


def agreement_table(records: list[Record]) -> str:
    """Each system against the first one (dense, when it leads), sample by sample on the prompts
    both answered: how many answers are the same text, how many scores are equal, and how many
    samples it scored above and below the first system. Averages hide this; a method that matches
    dense on average can still lose some needles and find others."""
    records = [r for r in eval_records(records) if r["task"] != "perplexity" and r.get("score") is not None]
    systems = unique_in_order(r["system"] for r in records)
    if len(systems) < 2:
        return ""
    reference = systems[0]

    def key(r: Record) -> tuple[Any, ...]:
        return r.get("seed"), r["task"], r["length"], r["index"]

    first = {key(r): r for r in records if r["system"] == reference}
    groups: dict[tuple[str, int], list[tuple[Record, Record]]] = defaultdict(list)
    for r in records:
        if r["system"] != reference and key(r) in first:
            groups[(r["system"], r["length"])].append((r, first[key(r)]))
    if not groups:
        return ""
    lines = [f"Against `{reference}`, sample by sample on the prompts both answered; p: two-sided sign test "
             "on the samples scored higher vs lower (small p: a difference unlikely to be chance).", "",
             "| system | length | samples | same answer | same score | scored higher | scored lower | p |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for (system, length), pairs in sorted(groups.items(), key=lambda item: (item[0][1], systems.index(item[0][0]))):
        same = sum(str(r.get("prediction", "")).strip() == str(f.get("prediction", "")).strip() for r, f in pairs)
        level = sum(r["score"] == f["score"] for r, f in pairs)
        higher = sum(r["score"] > f["score"] for r, f in pairs)
        lower = len(pairs) - level - higher
        lines.append(f"| {system} | {length_label(length)} | {len(pairs)} | {same} | {level} | {higher} | {lower} | "
                     f"{sign_test(higher, lower):.2g} |")
    return "\n".join(lines)


def sign_test(higher: int, lower: int) -> float:
    """Two-sided exact sign test: the chance of a split at least this uneven if either side were
    equally likely on each sample that differs (ties left out)."""
    n = higher + lower
    tail = sum(math.comb(n, i) for i in range(min(higher, lower) + 1)) / 2**n
    return min(1.0, 2 * tail)


def cost_table(records: list[Record]) -> str:
    """What each system spent per sample (eval records): medians."""
    records = [r for r in eval_records(records) if r.get("latency") is not None and r["task"] != "perplexity"]
    if not records:
        return ""
    lines = ["| system | length | samples | latency s | TTFT s | decode tok/s | tokens read per step | peak RSS MiB |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    groups: dict[tuple[str, int], list[Record]] = defaultdict(list)
    for r in records:
        groups[(r["system"], r["length"])].append(r)

    def median(group: list[Record], key: str, digits: int = 1) -> str:
        values = [r[key] for r in group if r.get(key) is not None]
        return f"{statistics.median(values):.{digits}f}" if values else "–"

    order = unique_in_order(r["system"] for r in records)
    for (system, length), group in sorted(groups.items(), key=lambda item: (item[0][1], order.index(item[0][0]))):
        peak = max((r.get("peak_rss_mib") or 0) for r in group)
        lines.append(f"| {system} | {length_label(length)} | {len(group)} | {median(group, 'latency', 2)} | "
                     f"{median(group, 'ttft', 2)} | {median(group, 'decode_tok_s')} | "
                     f"{median(group, 'tokens_attended', 0)} | {peak:.0f} |")
    return "\n".join(lines)


def perplexity_table(records: list[Record]) -> str:
    records = [r for r in eval_records(records) if r["task"] == "perplexity"]
    if not records:
        return ""
    lines = []
    for length in sorted({r["length"] for r in records}):
        group = [r for r in records if r["length"] == length]
        edges = unique_in_order((b["start"], b["end"]) for r in group for b in r.get("buckets", []))
        header = " | ".join(f"{length_label(s)}-{length_label(e)}" for s, e in edges)
        lines += [f"### Perplexity at {length_label(length)} tokens, by position", "",
                  f"| system | samples | {header} | all |", "|---|---:|" + "---:|" * (len(edges) + 1)]
        for system in unique_in_order(r["system"] for r in group):
            mine = [r for r in group if r["system"] == system]
            if any("refused" in r or "unsupported" in r for r in mine):
                why = "refused" if any("refused" in r for r in mine) else "unsupported"
                lines.append(f"| {system} | {len(mine)} | " + " | ".join([why] * (len(edges) + 1)) + " |")
                continue
            cells = []
            for start, end in edges:
                losses = [b["loss"] for r in mine for b in r["buckets"] if (b["start"], b["end"]) == (start, end)]
                cells.append(f"{_ppl(losses)}")
            lines.append(f"| {system} | {len(mine)} | " + " | ".join(cells) + f" | {_ppl([r['loss'] for r in mine])} |")
        lines.append("")
    return "\n".join(lines).rstrip()


def _ppl(losses: list[float]) -> str:
    import math

    return f"{math.exp(statistics.fmean(losses)):.2f}" if losses else "–"


def ratio_table(records: list[Record], baseline: str) -> str:
    """bench records: medians (min-max) per system and length, ratios against `baseline` measured in
    the same run (a `blockmem bench` invocation); several runs get a run column, never mixed."""
    records = bench_records(records)
    if not records:
        return ""
    Key = tuple[str, str, int]  # run, system, length
    groups: dict[Key, list[Record]] = defaultdict(list)
    for r in records:
        groups[(r.get("run", ""), r["system"], r["length"])].append(r)

    def values(key: Key, field: str) -> list[float]:
        return [r[field] for r in groups.get(key, []) if r.get(field) is not None]

    def mid(key: Key, field: str) -> float | None:
        found = values(key, field)
        return statistics.median(found) if found else None

    def cell(key: Key, field: str, digits: int = 1) -> str:
        found = values(key, field)
        if not found:
            return "–"
        spread = f" ({min(found):.{digits}f}-{max(found):.{digits}f})" if len(found) > 1 else ""
        return f"{statistics.median(found):.{digits}f}{spread}"

    def ratio(key: Key, field: str) -> str:
        value, base = mid(key, field), mid((key[0], baseline, key[2]), field)
        return f"{value / base:.2f}x" if value and base else "–"

    runs = unique_in_order(r.get("run", "") for r in records)
    column = len(runs) > 1
    lines = [f"| {'run | ' if column else ''}system | length | runs | prefill tok/s | vs {baseline} | TTFT s | "
             f"decode tok/s | vs {baseline} | peak RSS MiB | tokens read per step | MiB moved per token |",
             "|---" * (12 if column else 11) + "|"]
    systems = unique_in_order(r["system"] for r in records)
    for length in sorted({r["length"] for r in records}):
        for run in runs:
            for system in systems:
                key = (run, system, length)
                group = groups.get(key)
                if not group:
                    continue
                first = f"| {run} | {system}" if column else f"| {system}"
                refused = next((r["refused"] for r in group if r.get("refused")), None)
                error = next((r["error"] for r in group if r.get("error")), None)
                if refused or error:
                    lines.append(f"{first} | {length_label(length)} | – | {'refused' if refused else 'error: ' + error[:50]} "
                                 "| | | | | | | |")
                    continue
                moved, read = mid(key, "bytes_moved_per_token"), mid(key, "tokens_attended")
                lines.append(f"{first} | {length_label(length)} | {len(group)} | {cell(key, 'prefill_tok_s')} | "
                             f"{ratio(key, 'prefill_tok_s')} | {cell(key, 'ttft', 2)} | {cell(key, 'decode_tok_s')} | "
                             f"{ratio(key, 'decode_tok_s')} | {mid(key, 'peak_rss_mib') or 0:.0f} | "
                             f"{f'{read:.0f}' if read else '–'} | {f'{moved / 2**20:.2f}' if moved else '–'} |")
    return "\n".join(lines)


def write_report(records: list[Record], out: Path, baseline: str, plots: bool,
                 sources: list[str] | None = None, samples: int | None = None,
                 systems: list[str] | None = None) -> tuple[str, list[Path]]:
    """report.md (and PNGs) in `out` from eval samples 0..samples-1 (default: all) and every bench
    record, of `systems` only if given (in that order); returns the markdown and the files written."""
    records = by_model(first_samples(select_systems(records, systems), samples))
    out.mkdir(parents=True, exist_ok=True)
    files: list[Path] = []
    images: list[tuple[str, Path]] = []
    if plots:
        from blockmem.eval import plots as plotting

        images = plotting.draw_all(records, out)
        files += [path for _, path in images]
    parts = ["# blockmem evaluation report", ""]
    if sources:
        parts += ["Results: " + ", ".join(f"`{s}`" for s in sources), ""]
    if samples is not None:
        parts += [f"Samples: the first {samples} of each task and length (`--samples {samples}`).", ""]
    if systems:
        parts += [f"Systems: {'; '.join(systems)} (`--systems`; the results may hold others).", ""]
    models = unique_in_order(r.get("model") for r in records if r.get("model"))
    if models:
        parts += [f"Model: {', '.join(models)}", ""]
    for title, body in (("Accuracy (score x 100)", summary_table(records) if eval_records(records) else ""),
                        ("Agreement, sample by sample", agreement_table(records)),
                        ("Perplexity by position", perplexity_table(records)),
                        ("Cost per sample (medians; peak RSS is the worker's peak at that length)",
                         cost_table(records)),
                        (f"Speed and memory (blockmem bench; ratios against {baseline}, same run)",
                         ratio_table(records, baseline))):
        if body:
            parts += [f"## {title}", "", body, ""]
    for caption, path in images:
        parts += [f"![{caption}]({path.name})", ""]
    markdown = "\n".join(parts).rstrip() + "\n"
    report = out / "report.md"
    report.write_text(markdown, encoding="utf-8")
    files.insert(0, report)
    if not eval_records(records) and not bench_records(records):
        raise ConfigError("no eval or bench records in the results", "pass files written by blockmem eval/bench")
    return markdown, files
