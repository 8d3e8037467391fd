"""A sweep's results: ``results.csv``, ``results.md``, ``sweep.png`` and the final table.

One row per trial (``finetune.sweep.result_rows``): the trial's number, its value of each swept
key, status, best and final value of the monitored metric, epochs, training time, attempts and
run folder. Rows are sorted best first; trials without a value (running, failed early) last.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.measure import Measurement
from rich.table import Table

from finetune.run_folder import atomic_write_text

CSV_FILE = "results.csv"
MARKDOWN_FILE = "results.md"
PLOT_FILE = "sweep.png"


def metric_columns(metric: str) -> tuple[str, str]:
    """The columns of the best and the final value of ``metric``."""
    return f"best {metric}", f"final {metric}"


def sort_rows(rows: list[dict[str, Any]], metric: str, maximize: bool) -> list[dict[str, Any]]:
    """Best first by the best value of ``metric``; rows without one last, by trial."""
    best = metric_columns(metric)[0]

    def order(row: dict[str, Any]) -> tuple[bool, float, int]:
        value = row.get(best)
        missing = not _is_number(value)
        score = 0.0 if missing else (-value if maximize else value)
        return missing, score, row["trial"]

    return sorted(rows, key=order)


def write_results(
    folder: Path,
    rows: list[dict[str, Any]],
    *,
    keys: Sequence[str],
    metric: str,
    log_keys: Sequence[str] = (),
    plot: bool = True,
) -> None:
    """``results.csv`` and ``results.md`` in ``folder``, and with ``plot`` also ``sweep.png``.

    Args:
        rows: sorted rows (``sort_rows``), all with the same columns.
        keys: the swept keys (one panel each in the plot).
        log_keys: keys drawn on a log axis (``loguniform`` and ``logint`` searches).
    """
    atomic_write_text(folder / CSV_FILE, to_csv(rows, keys))
    atomic_write_text(folder / MARKDOWN_FILE, to_markdown(rows, keys))
    if plot and rows:
        plot_sweep(rows, folder / PLOT_FILE, keys=keys, metric=metric, log_keys=log_keys)


def to_csv(rows: list[dict[str, Any]], keys: Sequence[str]) -> str:
    """The rows as CSV, numbers in full precision."""
    if not rows:
        return ""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(rows[0])
    writer.writerows([cell(row[c], c in keys, rounded=False) for c in row] for row in rows)
    return out.getvalue()


def to_markdown(rows: list[dict[str, Any]], keys: Sequence[str]) -> str:
    """The rows as a Markdown table, numbers rounded for reading."""
    if not rows:
        return ""
    lines = ["| " + " | ".join(rows[0]) + " |", "|" + " --- |" * len(rows[0])]
    for row in rows:
        lines.append("| " + " | ".join(cell(row[c], c in keys) for c in row) + " |")
    return "\n".join(lines) + "\n"


def print_results(
    rows: list[dict[str, Any]], console: Console, *, keys: Sequence[str], title: str = ""
) -> None:
    """The rows as a table, as wide as it needs (a log's 80 columns would cut every name)."""
    columns = [column for column in rows[0] if column != "run_dir"] if rows else []
    table = Table(*columns, title=title or None)
    for row in rows:
        table.add_row(*(cell(row[column], column in keys) for column in columns))
    natural = Measurement.get(console, console.options.update_width(10_000), table).maximum
    wide = Console(file=console.file, width=max(console.width, natural), highlight=False)
    wide.print(table)


def cell(value: Any, swept: bool = False, rounded: bool = True) -> str:
    """A value as text: a swept ``None`` as YAML's ``null`` (another missing value is empty),
    lists and mappings as JSON, floats to 4 significant digits when ``rounded``."""
    if value is None:
        return "null" if swept else ""
    if isinstance(value, (list, dict)):
        return json.dumps(value)
    if isinstance(value, float) and rounded:
        return f"{value:.4g}"
    return str(value)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def plot_sweep(
    rows: list[dict[str, Any]],
    path: Path,
    *,
    keys: Sequence[str],
    metric: str,
    log_keys: Sequence[str] = (),
) -> None:
    """One panel per swept key: each trial's best ``metric`` against its value of that key.

    Numbers go on a numeric axis (log for ``log_keys``, and for positive values spanning 10x
    or more), other values (names, lists, booleans) one position each. Completed trials are
    filled circles; pruned, diverged and failed ones hollow.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    best = metric_columns(metric)[0]
    scored = [row for row in rows if _is_number(row[best])]
    fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 3.4), squeeze=False)
    for axis, key in zip(axes[0], keys, strict=True):
        values = [row[key] for row in scored]
        numeric = bool(values) and all(_is_number(value) for value in values)
        positions = values if numeric else _category_positions(axis, values)
        for done in (True, False):
            chosen = [i for i, row in enumerate(scored) if (row["status"] == "completed") == done]
            if not chosen:
                continue
            axis.scatter(
                [positions[i] for i in chosen],
                [scored[i][best] for i in chosen],
                facecolors="C0" if done else "none",
                edgecolors="C0",
                label="completed" if done else "stopped early",
            )
        if numeric and (key in log_keys or _wide(values)):
            axis.set_xscale("log")
        axis.set_xlabel(key)
        axis.set_ylabel(best)
        axis.grid(alpha=0.3)
    if scored:
        axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _category_positions(axis: Any, values: list[Any]) -> list[int]:
    labels = list(dict.fromkeys(cell(value, swept=True) for value in values))
    axis.set_xticks(range(len(labels)), labels, rotation=20, fontsize=8)
    return [labels.index(cell(value, swept=True)) for value in values]


def _wide(values: list[float]) -> bool:
    return min(values) > 0 and max(values) >= 10 * min(values)
