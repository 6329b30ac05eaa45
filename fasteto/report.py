"""Run reports: the paper's results table as Markdown, and one PNG of training curves and rewards.

The table follows the layout of ETO's results (rows = methods, columns = environment × split,
values = average reward × 100); each cell also carries the success rate and the number of tasks, because
small evaluation sets make a bare average misleading.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

ENV_NAMES = {"sciworld": "SciWorld", "alfworld": "ALFWorld", "webshop": "WebShop"}
MISSING = "–"

Column = tuple[str, str]  # (env, split)


def _collect(evaluations: list[dict]) -> tuple[list[str], list[Column], dict[tuple[str, Column], dict]]:
    """Labels and (env, split) columns in first-appearance order, and each evaluation by (label, column).

    Raises ValueError when two evaluations share a label, env and split: which one the report should
    show is the caller's decision, not ours.
    """
    labels: list[str] = []
    columns: list[Column] = []
    cells: dict[tuple[str, Column], dict] = {}
    for i, ev in enumerate(evaluations):
        label, column = str(ev["label"]), (str(ev["env"]), str(ev["split"]))
        if (label, column) in cells:
            raise ValueError(
                f"summary['evaluations'][{i}] repeats label {label!r} for {column[0]} {column[1]}; "
                "keep one evaluation per label, env and split (e.g. give re-runs their own label)"
            )
        if label not in labels:
            labels.append(label)
        if column not in columns:
            columns.append(column)
        cells[(label, column)] = ev
    return labels, columns, cells


def _column_title(column: Column) -> str:
    """`("sciworld", "seen")` -> `"SciWorld seen"`; unknown environments keep their own name."""
    env, split = column
    return f"{ENV_NAMES.get(env, env)} {split}"


def _cell(ev: dict) -> str:
    """One table cell: `"61.3 (40%, n=5)"` = average reward × 100, success rate, number of tasks."""
    return f"{ev['average_reward_x100']:.1f} ({ev['success_rate'] * 100:.0f}%, n={ev['n']})"


def results_table(summary: dict) -> str:
    """Render `summary["evaluations"]` as a Markdown table, one row per label, one column per env × split.

    Each evaluation is `{"label", "env", "split", "average_reward_x100", "success_rate" (0..1), "n"}`.
    Rows and columns keep their first-appearance order; a label never evaluated on a column shows `–`.
    The string has no trailing newline.
    """
    labels, columns, cells = _collect(summary.get("evaluations", []))
    lines = [
        "| " + " | ".join(["method"] + [_column_title(c) for c in columns]) + " |",
        "|" + "---|" * (len(columns) + 1),
    ]
    for label in labels:
        row = [_cell(cells[(label, c)]) if (label, c) in cells else MISSING for c in columns]
        lines.append("| " + " | ".join([label] + row) + " |")
    return "\n".join(lines)


def read_metrics(path: Path) -> list[dict]:
    """The records of a metrics.jsonl file, skipping blank lines and a truncated last line.

    A missing file gives no records (a run that has not logged yet). A malformed line before the last
    one raises ValueError naming the file and line, since it means the file is damaged, not unfinished.
    """
    path = Path(path)
    if not path.exists():
        return []
    lines = path.read_text(encoding="utf-8").splitlines()
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            if number == len(lines):
                break  # the writer was stopped mid-line
            raise ValueError(f"{path}:{number}: not a JSON object ({err}); fix or delete that line") from err
        if isinstance(record, dict):
            records.append(record)
    return records


def _number(value: Any) -> float | None:
    """`value` as a finite float, or None for missing, non-numeric or NaN/inf values."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return float(value)


def _series(records: list[dict], key: str) -> dict[str, tuple[list[float], list[float]]]:
    """Per phase, the (steps, values) of `key`, in file order; records lacking step or value are skipped."""
    series: dict[str, tuple[list[float], list[float]]] = {}
    for record in records:
        step, value = _number(record.get("step")), _number(record.get(key))
        if step is None or value is None:
            continue
        steps, values = series.setdefault(str(record.get("phase", "?")), ([], []))
        steps.append(step)
        values.append(value)
    return series


def _no_data(ax: Any) -> None:
    """Mark an empty subplot so an empty report still reads as intended, not as a broken figure."""
    ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes, color="gray")


def _phase_colors(records: list[dict]) -> dict[str, str]:
    """One colour per phase in first-appearance order, so a phase looks the same in every subplot."""
    phases = dict.fromkeys(str(r.get("phase", "?")) for r in records)
    return {phase: f"C{i % 10}" for i, phase in enumerate(phases)}


def _plot_losses(ax: Any, records: list[dict], colors: dict[str, str]) -> None:
    """Subplot 1: training loss against step, one line per phase."""
    ax.set_title("training loss")
    series = _series(records, "loss")
    for phase, (steps, values) in series.items():
        ax.plot(steps, values, color=colors[phase], label=phase)
    if series:
        ax.set_xlabel("step")
        ax.legend(fontsize="small")
    else:
        _no_data(ax)


def _plot_dpo(ax: Any, records: list[dict], colors: dict[str, str]) -> None:
    """Subplot 2: DPO reward accuracy (solid) and margin (dashed) against step, per phase."""
    ax.set_title("DPO rewards: accuracy (solid), margin (dashed)")
    accuracy, margin = _series(records, "rewards/accuracy"), _series(records, "rewards/margin")
    for phase in dict.fromkeys([*accuracy, *margin]):
        color = colors[phase]
        if phase in accuracy:
            ax.plot(*accuracy[phase], color=color, label=f"{phase} accuracy")
        if phase in margin:
            ax.plot(*margin[phase], color=color, linestyle="--", label=f"{phase} margin")
    if accuracy or margin:
        ax.set_xlabel("step")
        ax.legend(fontsize="small")
    else:
        _no_data(ax)


def _plot_rewards(ax: Any, evaluations: list[dict]) -> None:
    """Subplot 3: average reward × 100 per label, one bar per env × split within each label's group."""
    ax.set_title("evaluation: average reward × 100")
    labels, columns, cells = _collect(evaluations)
    if not labels:
        _no_data(ax)
        return
    width = 0.8 / len(columns)
    for j, column in enumerate(columns):
        offset = (j - (len(columns) - 1) / 2) * width
        present = [i for i, label in enumerate(labels) if (label, column) in cells]  # missing: no bar
        heights = [cells[(labels[i], column)]["average_reward_x100"] for i in present]
        xs = [i + offset for i in present]
        ax.bar(xs, heights, width=width, label=_column_title(column))
    ax.set_xticks(range(len(labels)), labels, fontsize="small")
    ax.legend(fontsize="small")


def plot_run(metrics_path: Path, summary: dict, out_png: Path) -> Path:
    """Draw a run's training loss, DPO reward statistics and evaluation rewards into one PNG.

    `metrics_path` is the run's metrics.jsonl (see `read_metrics`); `summary["evaluations"]` is as in
    `results_table`. The PNG is written to a temporary file beside `out_png` and moved into place, so a
    reader never sees half a picture. Empty inputs give subplots marked "no data". Returns `out_png`.
    """
    import matplotlib

    matplotlib.use("Agg")  # headless: training machines have no display
    import matplotlib.pyplot as plt

    out_png = Path(out_png)
    records = read_metrics(metrics_path)
    fig, axes = plt.subplots(3, 1, figsize=(8, 11))
    try:
        colors = _phase_colors(records)
        _plot_losses(axes[0], records, colors)
        _plot_dpo(axes[1], records, colors)
        _plot_rewards(axes[2], summary.get("evaluations", []))
        fig.tight_layout()
        out_png.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{out_png.name}.", suffix=".tmp", dir=out_png.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                fig.savefig(f, format="png", dpi=100)
            os.replace(tmp, out_png)
        except BaseException:
            os.unlink(tmp)
            raise
    finally:
        plt.close(fig)
    return out_png
