"""Run reports: the paper's results table as Markdown, and one PNG of training curves and rewards.

The table follows the layout of ETO's results (rows = methods, columns = environment × split,
values = average reward × 100); each cell also carries the success rate, the number of tasks and 95%
intervals (percentile bootstrap over tasks, ``fasteto.stats``), because small evaluation sets make a
bare average misleading. A second table gives paired differences between methods on the same tasks.
Summaries written before per-task rewards were kept still render, their intervals shown as ``n/a``.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

from fasteto import stats

ENV_NAMES = {"sciworld": "SciWorld", "alfworld": "ALFWorld", "webshop": "WebShop"}
MISSING = "–"
NOT_AVAILABLE = "n/a"
METRICS = ("average_reward_x100", "success_rate")
# How the intervals were made, written into summary.json beside them.
INTERVALS = {"method": "percentile bootstrap over tasks; differences paired on the same tasks",
             "level": stats.LEVEL, "resamples": stats.RESAMPLES, "seed": stats.SEED}
NOTE = (f"Cells: average reward × 100 [95% CI] (success rate [95% CI], tasks). Intervals: percentile "
        f"bootstrap over tasks ({stats.RESAMPLES:,} resamples, seed {stats.SEED}); differences are paired "
        "on the tasks both rows share, success in percentage points (pp); unpaired: tasks of one side "
        "only; n/a: no per-task rewards recorded.")

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


def column_title(column: Column) -> str:
    """`("sciworld", "seen")` -> `"SciWorld seen"`; unknown environments keep their own name."""
    env, split = column
    return f"{ENV_NAMES.get(env, env)} {split}"


def _metric_values(rewards: dict[str, float], metric: str) -> dict[str, float]:
    """Per task, the value `metric` averages: reward × 100, or 1.0 for a success (reward 1.0, as in
    `fasteto.rollout.explore.summarise`) and 0.0 otherwise."""
    if metric == "average_reward_x100":
        return {task: 100.0 * float(r) for task, r in rewards.items()}
    return {task: float(r == 1.0) for task, r in rewards.items()}


def with_intervals(row: dict) -> dict:
    """`row` plus `"ci95"`: `{metric: [low, high]}` for both metrics, bootstrapped over `row["rewards"]`
    (task id -> reward); None when the row has no tasks. Returns a new dict."""
    rewards = row["rewards"]
    ci = None
    if rewards:
        ci = {m: list(stats.bootstrap_ci(list(_metric_values(rewards, m).values()))) for m in METRICS}
    return {**row, "ci95": ci}


def _pooled_row(label: str, env: str, split: str, rows: list[dict]) -> dict:
    """One row over the tasks of ``rows``, their task ids made ``env/split/task`` so they stay distinct."""
    rewards = {f"{r['env']}/{r['split']}/{task}": float(v) for r in rows for task, v in r["rewards"].items()}
    means = {m: sum(_metric_values(rewards, m).values()) / max(1, len(rewards)) for m in METRICS}
    return with_intervals({"label": label, "env": env, "split": split, "n": len(rewards), **means,
                           "rewards": rewards})


def pooled(evaluations: list[dict]) -> list[dict]:
    """Rows pooling each label's tasks, for tighter intervals than one split gives: per environment over
    its splits (split ``"all"``, when it has two or more), and over every environment (env ``"all"``, split
    ``"tasks"``, when there are two or more). Every task weighs the same. Labels with a row lacking
    per-task rewards (an old summary) are left out. Rows as in `with_intervals`, in label order."""
    labels, columns, cells = _collect(evaluations)
    envs = list(dict.fromkeys(env for env, _ in columns))
    out = []
    for label in labels:
        mine = [cells[(label, c)] for c in columns if (label, c) in cells]
        if not mine or any("rewards" not in r for r in mine):
            continue
        for env in envs:
            rows = [r for r in mine if r["env"] == env]
            if len(rows) >= 2:
                out.append(_pooled_row(label, env, "all", rows))
        if len({r["env"] for r in mine}) >= 2:
            out.append(_pooled_row(label, "all", "tasks", mine))
    return out


def difference(row: dict, baseline: dict) -> dict | None:
    """`row` − `baseline`, paired on the tasks both have, for both metrics; None when either row has no
    per-task rewards (an old summary). Labels, env and split are the rows' own.

    `{"label", "baseline", "env", "split", "n_paired", "only_label", "only_baseline",
    "average_reward_x100": {"mean", "ci95"}, "success_rate": {"mean", "ci95"}}`; with no shared task
    the means and intervals are None.
    """
    if "rewards" not in row or "rewards" not in baseline:
        return None
    out: dict[str, Any] = {"label": row["label"], "baseline": baseline["label"], "env": row["env"],
                           "split": row["split"]}
    for metric in METRICS:
        d = stats.paired_difference(_metric_values(row["rewards"], metric),
                                    _metric_values(baseline["rewards"], metric))
        out.update(n_paired=d.n_paired, only_label=d.only_a, only_baseline=d.only_b)
        out[metric] = {"mean": d.mean, "ci95": None if d.ci is None else list(d.ci)}
    return out


def differences(evaluations: list[dict]) -> list[dict]:
    """Paired differences between the labels of a run, per env × split: each label minus the one before
    it (SFT − base, ETO iteration k − the previous), then each later label minus the first (vs base).
    Rows without per-task rewards are left out. See `difference` for one entry."""
    labels, columns, cells = _collect(evaluations)
    pairs = list(zip(labels[1:], labels, strict=False)) + [(label, labels[0]) for label in labels[2:]]
    out = []
    for label, baseline in pairs:
        for column in columns:
            if (label, column) in cells and (baseline, column) in cells:
                d = difference(cells[(label, column)], cells[(baseline, column)])
                if d is not None:
                    out.append(d)
    return out


def _interval(ci: list[float] | None, scale: float = 1.0, digits: int = 1) -> str:
    """`[48.2, 74.0]`, or `[n/a]` when no interval is known."""
    if ci is None:
        return f"[{NOT_AVAILABLE}]"
    return f"[{ci[0] * scale:.{digits}f}, {ci[1] * scale:.{digits}f}]"


def _ci(ev: dict, metric: str) -> list[float] | None:
    """The row's 95% interval of `metric`, or None (a row of an old summary, or with no tasks)."""
    return (ev.get("ci95") or {}).get(metric)


def _cell(ev: dict) -> str:
    """One table cell, `"61.3 [48.2, 74.0] (40% [20, 60], n=5)"`: average reward × 100 and its 95%
    interval, success rate and its interval, number of tasks; `[n/a]` where a summary has no intervals."""
    if ev["n"] == 0:
        return "no tasks"
    reward, success = _interval(_ci(ev, "average_reward_x100")), _interval(_ci(ev, "success_rate"), 100, 0)
    rate = ev["success_rate"] * 100
    return f"{ev['average_reward_x100']:.1f} {reward} ({rate:.0f}% {success}, n={ev['n']})"


def results_table(summary: dict, corner: str = "method") -> str:
    """Render `summary["evaluations"]` (then `summary["pooled"]`, see `pooled`) as a Markdown table, one
    row per label, one column per env × split.

    Each evaluation is `{"label", "env", "split", "average_reward_x100", "success_rate" (0..1), "n"}`,
    optionally with `"ci95"` (see `with_intervals`). Rows and columns keep their first-appearance order;
    a label never evaluated on a column shows `–`; `corner` heads the labels. No trailing newline.
    """
    labels, columns, cells = _collect(summary.get("evaluations", []) + summary.get("pooled", []))
    return _table(corner, labels, columns, {key: _cell(ev) for key, ev in cells.items()})


def _difference_cell(d: dict) -> str:
    """`"+4.2 [-1.3, 9.8] (+20 pp [0, 40], n=5)"`: paired mean difference of reward × 100 and of the
    success rate (percentage points), each with its 95% interval, and the number of tasks paired."""
    unpaired = d["only_label"] + d["only_baseline"]
    if d["n_paired"] == 0:
        return f"no shared tasks ({unpaired} unpaired)"
    count = f"n={d['n_paired']}" + (f" paired, {unpaired} unpaired" if unpaired else "")
    reward, success = d["average_reward_x100"], d["success_rate"]
    return (f"{reward['mean']:+.1f} {_interval(reward['ci95'])} "
            f"({success['mean'] * 100:+.0f} pp {_interval(success['ci95'], 100, 0)}, {count})")


def differences_table(entries: list[dict]) -> str:
    """Render paired differences (see `difference`) as a Markdown table: one row per `label − baseline`,
    one column per env × split, in first-appearance order; `n/a` where a pair has no entry for a column
    (no per-task rewards). With no entries, one sentence saying so. No trailing newline."""
    if not entries:
        return "No paired differences: fewer than two methods with per-task rewards."
    rows: list[str] = []
    columns: list[Column] = []
    cells: dict[tuple[str, Column], str] = {}
    for d in entries:
        name, column = f"{d['label']} − {d['baseline']}", (str(d["env"]), str(d["split"]))
        rows += [name] if name not in rows else []
        columns += [column] if column not in columns else []
        cells[(name, column)] = _difference_cell(d)
    return _table("difference", rows, columns, cells, empty=NOT_AVAILABLE)


def report_markdown(summary: dict) -> str:
    """The results table, the table of `summary["differences"]` and a note on what the intervals are."""
    return "\n\n".join([results_table(summary), differences_table(summary.get("differences", [])), NOTE])


def _table(corner: str, rows: list[str], columns: list[Column], cells: dict[tuple[str, Column], str],
           empty: str = MISSING) -> str:
    """A Markdown table: `corner` above the row names, env × split column titles, `empty` for gaps."""
    lines = [
        "| " + " | ".join([corner] + [column_title(c) for c in columns]) + " |",
        "|" + "---|" * (len(columns) + 1),
    ]
    for row in rows:
        lines.append("| " + " | ".join([row] + [cells.get((row, c), empty) for c in columns]) + " |")
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
    """Subplot 3: average reward × 100 per label, one bar per env × split within each label's group, with
    its 95% interval as an error bar where the summary has one."""
    ax.set_title("evaluation: average reward × 100 (95% bootstrap CI)")
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
        ax.bar(xs, heights, width=width, label=column_title(column))
        bars = [(x, h, _ci(cells[(labels[i], column)], "average_reward_x100"))
                for x, h, i in zip(xs, heights, present, strict=True)]
        bars = [(x, h, ci) for x, h, ci in bars if ci is not None]  # old summaries: no error bar
        if bars:  # asymmetric: a bootstrap interval need not be centred on the mean
            ax.errorbar([x for x, _, _ in bars], [h for _, h, _ in bars],
                        yerr=[[max(0.0, h - ci[0]) for _, h, ci in bars],
                              [max(0.0, ci[1] - h) for _, h, ci in bars]],
                        fmt="none", ecolor="black", capsize=3, linewidth=1, zorder=3)  # above the bars
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
        _plot_rewards(axes[2], summary.get("evaluations", []) + summary.get("pooled", []))
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
