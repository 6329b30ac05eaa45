"""`fasteto compare`: the results of several run folders side by side, with paired differences.

Every (run, method) row is listed with its intervals; then each chosen pair of rows is compared on the
tasks both evaluated (see ``fasteto.report.difference``). By default the first run is the baseline and
each later run is compared with it, method by method, for the methods both have; ``--rows`` names the
pairs instead. Two runs with different seeds usually sample different test tasks, so the output says how
many tasks each difference paired and how many were left out.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from fasteto.report import NOTE, column_title, difference, differences_table, pooled, results_table

REQUIRED = ("label", "env", "split", "average_reward_x100", "success_rate", "n")
Pairs = list[tuple[tuple[str, str], tuple[str, str]]]  # ((run, label), (baseline run, baseline label))


def _rerun_hint(folder: str) -> str:
    return (f"rerun `python -m fasteto.train --run_dir {folder}` with that run's options: finished phases "
            "are skipped and summary.json is written at the end")


def load_summary(folder: str | os.PathLike) -> dict:
    """A run folder's summary.json, checked: a dict whose `evaluations` rows have the keys of a row.

    Raises ValueError naming the folder (or file and row) and the fix when the file is missing, is not
    JSON, or lacks what a report needs.
    """
    path, hint = Path(folder) / "summary.json", _rerun_hint(str(folder))
    if not Path(folder).is_dir():
        raise ValueError(f"{folder}: no such run folder; give the --run_dir of a `python -m fasteto.train` "
                         "run")
    if not path.exists():
        raise ValueError(f"{folder}: no summary.json, so the run has not finished; {hint}")
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: not valid JSON ({err}); {hint}") from err
    if not isinstance(summary, dict) or not isinstance(summary.get("evaluations"), list):
        raise ValueError(f"{path}: no 'evaluations' list, so not a fasteto run summary; {hint}")
    for i, row in enumerate(summary["evaluations"]):
        missing = [k for k in REQUIRED if not isinstance(row, dict) or k not in row]
        if missing:
            raise ValueError(f"{path}: evaluations[{i}] lacks {', '.join(missing)}; {hint}")
    return summary


def run_name(folder: str) -> str:
    """The name a run goes by in the output: the folder as given, without a trailing slash."""
    return folder.rstrip("/") or folder


def resolve_row(spec: str, runs: dict[str, dict]) -> tuple[str, str]:
    """`"RUN:LABEL"` -> (run name, label), RUN being a run's name (see `run_name`) or its last folder
    name when that is unique. Raises ValueError naming what does not match and what would."""
    candidates: dict[str, str] = {name: name for name in runs}
    basenames = [Path(name).name for name in runs]
    candidates.update({Path(n).name: n for n in runs if basenames.count(Path(n).name) == 1})
    matches = [alias for alias in candidates if spec.startswith(alias + ":")]
    if not matches:
        raise ValueError(f"--rows {spec!r}: no run named before the ':'; write RUN:LABEL with RUN one of "
                         f"{', '.join(runs)}")
    alias = max(matches, key=len)  # "runs/a:b:SFT" prefers the run "runs/a:b" over "runs/a"
    name, label = candidates[alias], spec[len(alias) + 1:]
    labels = list(dict.fromkeys(row["label"] for row in runs[name]["evaluations"]))
    if label not in labels:
        raise ValueError(f"--rows {spec!r}: {name} has no method {label!r}; it has {', '.join(labels)}")
    return name, label


def default_pairs(runs: dict[str, dict]) -> Pairs:
    """((run, label), (baseline run, label)) for each later run against the first, per shared label."""
    names = list(runs)
    first = list(dict.fromkeys(row["label"] for row in runs[names[0]]["evaluations"]))
    pairs = []
    for name in names[1:]:
        labels = dict.fromkeys(row["label"] for row in runs[name]["evaluations"])
        pairs += [((name, label), (names[0], label)) for label in labels if label in first]
    return pairs


def _rows(runs: dict[str, dict]) -> list[dict]:
    """Every run's rows and its pooled rows (recomputed, see `fasteto.report.pooled`), each labelled
    `"run: label"` so one table can hold them all."""
    return [{**row, "label": f"{name}: {row['label']}"} for name, summary in runs.items()
            for row in summary["evaluations"] + pooled(summary["evaluations"])]


def _pairing_lines(entries: list[dict]) -> list[str]:
    """One line per difference that left tasks out: how many were paired and how many each side alone had."""
    lines = []
    for d in entries:
        if d["only_label"] or d["only_baseline"]:
            lines.append(f"- {d['label']} − {d['baseline']}, {column_title((d['env'], d['split']))}: "
                         f"{d['n_paired']} tasks "
                         f"paired; {d['only_label']} only in {d['label']}, {d['only_baseline']} only in "
                         f"{d['baseline']}")
    return lines or ["Every difference paired all the tasks of both rows."]


def compare_markdown(runs: dict[str, dict], pairs: Pairs, how: str = "") -> str:
    """The Markdown `fasteto compare` prints: all rows, then `how` (a sentence on how the pairs were
    chosen), the paired differences of `pairs` ((run, label) minus (baseline run, label), per env × split
    both evaluated), how tasks were paired, and the note on the intervals."""
    rows = _rows(runs)
    by_key = {(r["label"], r["env"], r["split"]): r for r in rows}
    entries, without_rewards = [], []
    for (run, label), (base_run, base_label) in pairs:
        for r in rows:
            if r["label"] != f"{run}: {label}":
                continue
            baseline = by_key.get((f"{base_run}: {base_label}", r["env"], r["split"]))
            if baseline is None:
                continue
            d = difference(r, baseline)
            if d is None:
                without_rewards.append(f"{r['label']} − {baseline['label']}, "
                                       f"{column_title((r['env'], r['split']))}")
            else:
                entries.append(d)
    parts = ["## Rows", results_table({"evaluations": rows}, corner="run: method"), "## Paired differences"]
    parts += [how] if how else []
    if entries:
        parts += [differences_table(entries), "\n".join(_pairing_lines(entries))]
    elif not pairs:
        parts.append("No method is in more than one run; choose pairs with --rows RUN:LABEL RUN:LABEL.")
    else:
        parts.append("No pair of rows shares an environment and split with per-task rewards on both sides.")
    if without_rewards:
        parts.append("Not compared, no per-task rewards (a summary written before they were kept): "
                     + "; ".join(without_rewards) + ".")
    parts.append(NOTE)
    return "\n\n".join(parts)


def compare(folders: list[str], row_specs: list[str] | None = None) -> str:
    """Load each run folder's summary and return `compare_markdown` for the default pairs, or for
    `row_specs` (`"RUN:LABEL"`, at least two: each later one minus the first)."""
    runs: dict[str, dict] = {}
    for folder in folders:
        name = run_name(folder)
        if name in runs:
            raise ValueError(f"{name} is given twice; give each run folder once")
        runs[name] = load_summary(folder)
    if row_specs is None:
        pairs = default_pairs(runs)
        how = f"Each later run minus the first ({next(iter(runs))}), for every method both have."
    else:
        if len(row_specs) < 2:
            raise ValueError("--rows needs at least two RUN:LABEL rows: the baseline, then each row to "
                             "compare with it")
        chosen = [resolve_row(spec, runs) for spec in row_specs]
        pairs = [(row, chosen[0]) for row in chosen[1:]]
        how = f"Each row of --rows minus the first ({chosen[0][0]}: {chosen[0][1]})."
    return compare_markdown(runs, pairs, how)
