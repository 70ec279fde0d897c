"""PNG plots for `blockmem report` (matplotlib, drawn off-screen)."""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

from blockmem.errors import ConfigError
from blockmem.eval.report import accuracy, bench_records, eval_records, length_label, unique_in_order

Record = dict[str, Any]


def _pyplot() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ConfigError("plots need matplotlib", 'pip install "blockmem[eval]", or pass --no-plots') from None
    return plt


def draw_all(records: list[Record], out: Path) -> list[tuple[str, Path]]:
    """Every plot the records support: [(caption, path)]."""
    plt = _pyplot()
    drawn = []
    for caption, name, draw in (("Accuracy by context length and needle depth", "heatmap.png", _heatmap),
                                ("Accuracy vs context length", "accuracy_vs_length.png", _accuracy_vs_length),
                                ("Decode speed vs context length", "decode_vs_length.png", _speed),
                                ("Peak memory vs context length", "memory_vs_length.png", _memory),
                                ("Perplexity by position", "perplexity.png", _perplexity)):
        figure = draw(plt, records)
        if figure is not None:
            path = out / name
            figure.savefig(path, dpi=120, bbox_inches="tight")
            plt.close(figure)
            drawn.append((caption, path))
    return drawn


def _heatmap(plt: Any, records: list[Record]) -> Any:
    rows = [r for r in eval_records(records) if r.get("depth") is not None and r.get("score") is not None]
    if not rows:
        return None
    systems = unique_in_order(r["system"] for r in rows)
    lengths = sorted({r["length"] for r in rows})
    depths = sorted({round(r["depth"], 2) for r in rows})
    columns = min(3, len(systems))
    lines = math.ceil(len(systems) / columns)
    figure, axes = plt.subplots(lines, columns, figsize=(4.2 * columns, (0.45 * len(lengths) + 2.4) * lines),
                                squeeze=False, constrained_layout=True)
    for number, system in enumerate(systems):
        axis = axes[number // columns][number % columns]
        grid = [[math.nan] * len(depths) for _ in lengths]
        cells: dict[tuple[int, float], list[float]] = defaultdict(list)
        for r in rows:
            if r["system"] == system:
                cells[(r["length"], round(r["depth"], 2))].append(r["score"])
        for (length, depth), scores in cells.items():
            grid[lengths.index(length)][depths.index(depth)] = statistics.fmean(scores)
        image = axis.imshow(grid, cmap="RdYlGn", vmin=0, vmax=1, aspect="auto")
        for i, row in enumerate(grid):
            for j, value in enumerate(row):
                if not math.isnan(value):
                    axis.text(j, i, f"{100 * value:.0f}", ha="center", va="center", fontsize=8)
        axis.set_xticks(range(len(depths)), [f"{100 * d:.0f}%" for d in depths])
        axis.set_yticks(range(len(lengths)), [length_label(n) for n in lengths])
        if number // columns == lines - 1 or number + columns >= len(systems):
            axis.set_xlabel("needle depth (0% = start)")
        if number % columns == 0:
            axis.set_ylabel("context length (tokens)")
        axis.set_title(wrap_label(system), fontsize=10)
    for number in range(len(systems), lines * columns):
        axes[number // columns][number % columns].axis("off")
    figure.colorbar(image, ax=axes, shrink=0.8, label="accuracy")
    figure.suptitle("Needle tasks (niah_*, passkey, QA): accuracy by length and depth")
    return figure


def wrap_label(label: str, width: int = 34) -> str:
    """A system label broken after commas into lines of at most ~`width` characters, so long
    method specs ('blocksparse:position=infllm,exec_size=16,...') don't run into their neighbours."""
    lines = [""]
    for piece in label.replace(",", ",\0").split("\0"):
        if lines[-1] and len(lines[-1]) + len(piece) > width:
            lines.append("")
        lines[-1] += piece
    return "\n".join(lines)


def line_style(index: int) -> dict[str, Any]:
    """The index-th series' look: ten colours, then the same colours with another marker and dash,
    so that no two of up to 30 series look alike."""
    return {"color": f"C{index % 10}", "marker": "osD"[index // 10 % 3], "linestyle": ("-", "--", ":")[index // 10 % 3]}


def _lines(plt: Any, series: dict[str, list[tuple[int, float]]], ylabel: str, title: str, log_y: bool = False) -> Any:
    if not any(series.values()):
        return None
    figure, axis = plt.subplots(figsize=(7, 4.5))
    for index, (system, points) in enumerate((s, p) for s, p in series.items() if p):
        points.sort()
        axis.plot([p[0] for p in points], [p[1] for p in points], label=system, **line_style(index))
    lengths = sorted({p[0] for points in series.values() for p in points})
    axis.set_xscale("log", base=2)
    axis.set_xticks(lengths, [length_label(n) for n in lengths])
    axis.minorticks_off()
    if log_y:
        axis.set_yscale("log")
    axis.set_xlabel("context length (tokens)")
    axis.set_ylabel(ylabel)
    axis.set_title(title)
    axis.grid(alpha=0.3)
    # beside the axes, not over the lines (saved with bbox_inches="tight", so the figure grows)
    axis.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0)
    return figure


def _accuracy_vs_length(plt: Any, records: list[Record]) -> Any:
    table = accuracy(eval_records(records))
    if not table:
        return None
    series: dict[str, list[tuple[int, float]]] = defaultdict(list)
    for system in unique_in_order(key[0] for key in table):
        for length in sorted({key[2] for key in table}):
            means = [mean for (s, _, n), (mean, _, _) in table.items() if s == system and n == length]
            if means and None not in means:
                series[system].append((length, 100 * statistics.fmean(means)))
    figure = _lines(plt, series, "accuracy, mean over tasks (%)", "Accuracy vs context length")
    if figure is not None:
        figure.axes[0].set_ylim(-2, 102)
    return figure


def _by_length(records: list[Record], key: str, worst: bool = False) -> dict[str, list[tuple[int, float]]]:
    """Median (or max) of `key` per system and length, from bench records when there are any.
    A bench file can hold several runs (appended over time, often of different code): each point
    comes from the latest run that measured it, never a blend of runs."""
    rows = bench_records(records)
    if rows:
        latest = {(r["system"], r["length"]): r.get("run", "") for r in rows}  # appended in time order
        rows = [r for r in rows if r.get("run", "") == latest[(r["system"], r["length"])]]
    else:
        rows = [r for r in eval_records(records) if r["task"] != "perplexity"]
    groups: dict[tuple[str, int], list[float]] = defaultdict(list)
    for r in rows:
        if r.get(key) is not None:
            groups[(r["system"], r["length"])].append(r[key])
    series: dict[str, list[tuple[int, float]]] = defaultdict(list)
    for (system, length), values in groups.items():
        series[system].append((length, max(values) if worst else statistics.median(values)))
    return series


def _speed(plt: Any, records: list[Record]) -> Any:
    return _lines(plt, _by_length(records, "decode_tok_s"), "decode tokens/s (median)", "Decode speed vs length")


def _memory(plt: Any, records: list[Record]) -> Any:
    return _lines(plt, _by_length(records, "peak_rss_mib", worst=True), "peak RSS (MiB)", "Peak memory vs length")


def _perplexity(plt: Any, records: list[Record]) -> Any:
    rows = [r for r in eval_records(records) if r["task"] == "perplexity" and r.get("buckets")]
    if not rows:
        return None
    length = max(r["length"] for r in rows)
    figure, axis = plt.subplots(figsize=(7, 4.5))
    for system in unique_in_order(r["system"] for r in rows):
        losses: dict[int, list[float]] = defaultdict(list)
        for r in rows:
            if r["system"] == system and r["length"] == length:
                for b in r["buckets"]:
                    losses[b["end"]].append(b["loss"])
        ends = sorted(losses)
        axis.plot(ends, [math.exp(statistics.fmean(losses[e])) for e in ends], marker="o", label=system)
    axis.set_xscale("log", base=2)
    axis.set_xlabel("token position (end of bucket)")
    axis.set_ylabel("perplexity")
    axis.set_title(f"Perplexity by position ({length_label(length)}-token texts)")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    return figure
