"""Tests for fasteto.report: the exact results and differences tables, and PNGs from real, empty and
truncated logs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fasteto.data.types import Trajectory
from fasteto.report import (
    NOTE,
    differences,
    differences_table,
    plot_run,
    pooled,
    read_metrics,
    report_markdown,
    results_table,
    with_intervals,
)
from fasteto.rollout.explore import summarise

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _ev(label: str, env: str, split: str, reward: float, success: float, n: int) -> dict:
    return {
        "label": label,
        "env": env,
        "split": split,
        "average_reward_x100": reward,
        "success_rate": success,
        "n": n,
    }


SUMMARY = {
    "evaluations": [
        _ev("base", "sciworld", "seen", 3.84, 0.0, 5),
        _ev("SFT", "sciworld", "seen", 61.25, 0.4, 5),
        _ev("SFT", "alfworld", "unseen", 66.666, 2 / 3, 3),
        _ev("ETO iteration 1", "alfworld", "unseen", 100.0, 1.0, 3),
        _ev("ETO iteration 1", "sciworld", "seen", 73.8, 0.6, 5),
    ]
}


def _png_size(path: Path) -> tuple[int, int]:
    """(width, height) from the PNG's IHDR chunk."""
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def test_results_table_old_summary_says_n_a():
    # A summary written before intervals were kept (no "ci95"): every interval reads "[n/a]". "base"
    # has no ALFWorld unseen result: the cell must read "–"; 61.25 is an exact tie that Python rounds
    # half-to-even (61.2); 2/3 success shows as 67%.
    expected = (
        "| method | SciWorld seen | ALFWorld unseen |\n"
        "|---|---|---|\n"
        "| base | 3.8 [n/a] (0% [n/a], n=5) | – |\n"
        "| SFT | 61.2 [n/a] (40% [n/a], n=5) | 66.7 [n/a] (67% [n/a], n=3) |\n"
        "| ETO iteration 1 | 73.8 [n/a] (60% [n/a], n=5) | 100.0 [n/a] (100% [n/a], n=3) |"
    )
    assert results_table(SUMMARY) == expected
    markdown = report_markdown(SUMMARY)  # no "differences" key either: said in words, no crash
    assert markdown == "\n\n".join(
        [expected, "No paired differences: fewer than two methods with per-task rewards.", NOTE])


def test_results_table_with_intervals_and_no_tasks():
    rows = [
        {**_ev("SFT", "sciworld", "seen", 61.25, 0.4, 5),
         "ci95": {"average_reward_x100": [48.24, 74.0], "success_rate": [0.2, 0.6]}},
        {**_ev("SFT", "alfworld", "seen", 0.0, 0.0, 0), "rewards": {}, "ci95": None},
    ]
    assert results_table({"evaluations": rows}) == (
        "| method | SciWorld seen | ALFWorld seen |\n"
        "|---|---|---|\n"
        "| SFT | 61.2 [48.2, 74.0] (40% [20, 60], n=5) | no tasks |"
    )


def test_row_from_summarise_keeps_rewards_in_task_order_and_intervals():
    # As phases._evaluate builds a row: a crash (None) is scored 0.0; rewards keep task order.
    trajs = [Trajectory(id=i, conversations=[], reward=r) for i, r in [(7, 1.0), (3, None), (5, 0.5)]]
    result = summarise(trajs)
    assert list(result.rewards.items()) == [("7", 1.0), ("3", 0.0), ("5", 0.5)]
    with pytest.raises(ValueError, match="task '7' has two trajectories"):
        summarise(trajs + trajs[:1])
    # Two tasks, rewards 0 and 1: a resample mean is 0, 0.5 or 1 (chances 1/4, 1/2, 1/4), so the 2.5%
    # and 97.5% quantiles of 10,000 resamples are the extremes.
    row = with_intervals({"label": "x", "rewards": {"a": 1.0, "b": 0.0}})
    assert row["ci95"] == {"average_reward_x100": [0.0, 100.0], "success_rate": [0.0, 1.0]}
    one = with_intervals({"label": "x", "rewards": {"a": 0.5}})  # degenerate, exact
    assert one["ci95"] == {"average_reward_x100": [50.0, 50.0], "success_rate": [0.0, 0.0]}
    assert with_intervals({"label": "x", "rewards": {}})["ci95"] is None


def _row(label: str, env: str, rewards: dict[str, float] | None) -> dict:
    """A row as a run writes it; `rewards=None`: one from an old summary."""
    values = list((rewards or {"t": 0.0}).values())
    row = _ev(label, env, "seen", 100 * sum(values) / len(values),
              sum(v == 1.0 for v in values) / len(values), len(values))
    return row if rewards is None else with_intervals({**row, "rewards": rewards})


def test_differences_consecutive_and_vs_first_exact():
    # Hand-computed: per-task differences on tasks t1, t2 (reward x 100; success 0/1 per task).
    #   SFT - base: reward (50, 50) -> +50 [50, 50]; success (0, 1) -> +0.5 [0, 1]
    #   ETO - SFT:  reward (50, 0)  -> +25 [0, 50];  success (1, 0) -> +0.5 [0, 1]
    #   ETO - base: reward (100, 50) -> +75 [50, 100]; success (1, 1) -> +1 [1, 1]
    # With two tasks the 95% interval is the range of the two differences (see the test above).
    evaluations = [
        _row("base", "sciworld", {"t1": 0.0, "t2": 0.5}),
        _row("SFT", "sciworld", {"t1": 0.5, "t2": 1.0}),
        _row("ETO iteration 1", "sciworld", {"t1": 1.0, "t2": 1.0}),
        _row("base", "alfworld", None),  # an old row: no difference with it
        _row("SFT", "alfworld", {"g": 1.0}),
    ]
    entries = differences(evaluations)
    assert [(d["label"], d["baseline"], d["env"]) for d in entries] == [
        ("SFT", "base", "sciworld"), ("ETO iteration 1", "SFT", "sciworld"),
        ("ETO iteration 1", "base", "sciworld")]
    assert entries[1] == {
        "label": "ETO iteration 1", "baseline": "SFT", "env": "sciworld", "split": "seen",
        "n_paired": 2, "only_label": 0, "only_baseline": 0,
        "average_reward_x100": {"mean": 25.0, "ci95": [0.0, 50.0]},
        "success_rate": {"mean": 0.5, "ci95": [0.0, 1.0]},
    }
    assert differences_table(entries + [{**entries[0], "env": "alfworld", "n_paired": 0,
                                         "only_label": 1, "only_baseline": 2}]) == (
        "| difference | SciWorld seen | ALFWorld seen |\n"
        "|---|---|---|\n"
        "| SFT − base | +50.0 [50.0, 50.0] (+50 pp [0, 100], n=2) | no shared tasks (3 unpaired) |\n"
        "| ETO iteration 1 − SFT | +25.0 [0.0, 50.0] (+50 pp [0, 100], n=2) | n/a |\n"
        "| ETO iteration 1 − base | +75.0 [50.0, 100.0] (+100 pp [100, 100], n=2) | n/a |"
    )


def test_pooled_rows_per_env_and_overall_exact():
    # base: sciworld seen t1 0.5, unseen t1 1.0 (same id, other split); alfworld seen g 0.0.
    # Pooled sciworld: 2 tasks, mean 75, success 1/2; all tasks: 3 tasks, mean 50, success 1/3.
    # alfworld has one split: no pooled row of its own. "old" lacks rewards: no pooled rows.
    def row(label, env, split, rewards):
        return {**_row(label, env, rewards), "split": split}

    evaluations = [row("base", "sciworld", "seen", {"t1": 0.5}),
                   row("base", "sciworld", "unseen", {"t1": 1.0}),
                   row("base", "alfworld", "seen", {"g": 0.0}), _row("old", "sciworld", None)]
    rows = pooled(evaluations)
    assert [(r["label"], r["env"], r["split"], r["n"]) for r in rows] == [
        ("base", "sciworld", "all", 2), ("base", "all", "tasks", 3)]
    assert rows[0]["rewards"] == {"sciworld/seen/t1": 0.5, "sciworld/unseen/t1": 1.0}
    assert (rows[0]["average_reward_x100"], rows[0]["success_rate"]) == (75.0, 0.5)
    assert (rows[1]["average_reward_x100"], rows[1]["success_rate"]) == (50.0, 1 / 3)
    assert rows[1]["ci95"]["average_reward_x100"][0] >= 0.0 and rows[1]["ci95"]["success_rate"][1] <= 1.0
    table = results_table({"evaluations": evaluations[:3], "pooled": rows})
    assert table.splitlines()[0] == ("| method | SciWorld seen | SciWorld unseen | ALFWorld seen "
                                     "| SciWorld all | all tasks |")
    # Differences pair pooled rows on the prefixed task ids.
    later = [row("SFT", "sciworld", "seen", {"t1": 1.0}), row("SFT", "sciworld", "unseen", {"t1": 1.0})]
    diffs = differences(evaluations[:2] + later + pooled(evaluations[:2] + later))
    pooled_diff = [d for d in diffs if d["split"] == "all"]
    assert [(d["n_paired"], d["average_reward_x100"]["mean"]) for d in pooled_diff] == [(2, 25.0)]


def test_results_table_empty_and_duplicate():
    assert results_table({"evaluations": []}) == "| method |\n|---|"
    duplicate = {"evaluations": [_ev("SFT", "sciworld", "seen", 1.0, 0.0, 1)] * 2}
    with pytest.raises(ValueError, match=r"\[1\] repeats label 'SFT' for sciworld seen"):
        results_table(duplicate)


def _write_metrics(path: Path) -> None:
    records = [{"phase": "sft", "step": s, "loss": 2.0 / (s + 1)} for s in range(6)]
    records.append({"phase": "sft", "step": 6})  # no loss: skipped, not plotted as zero
    for k, phase in enumerate(("dpo-1", "dpo-2")):
        records += [
            {
                "phase": phase,
                "step": s,
                "loss": 0.69 - 0.05 * s * (k + 1),
                "rewards/accuracy": 0.5 + 0.1 * s,
                "rewards/margin": 0.2 * s,
            }
            for s in range(4)
        ]
    lines = [json.dumps(r) for r in records]
    path.write_text("\n".join(lines) + '\n{"phase": "dpo-2", "step": 4, "lo', encoding="utf-8")


def test_read_metrics_skips_truncated_last_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    _write_metrics(path)
    records = read_metrics(path)
    assert len(records) == 7 + 8
    assert records[-1] == {
        "phase": "dpo-2",
        "step": 3,
        "loss": pytest.approx(0.39),
        "rewards/accuracy": pytest.approx(0.8),
        "rewards/margin": pytest.approx(0.6),
    }


def test_read_metrics_damaged_middle_line_names_the_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 0}\n{"step": \n{"step": 2}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"metrics\.jsonl:2: not a JSON object"):
        read_metrics(path)


def test_plot_run_writes_png(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    _write_metrics(metrics)
    out = tmp_path / "report" / "run.png"
    summary = {"evaluations": [*SUMMARY["evaluations"][:4], _row("ETO iteration 1", "sciworld",
                                                               {"a": 1.0, "b": 0.25, "c": 0.5})]}
    assert plot_run(metrics, summary, out) == out  # error bars where a row has an interval
    assert _png_size(out) == (800, 1100)
    assert out.stat().st_size > 20_000
    assert sorted(p.name for p in out.parent.iterdir()) == ["run.png"]  # no temp file left behind


def test_plot_run_empty_inputs(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("", encoding="utf-8")
    out = tmp_path / "empty.png"
    plot_run(metrics, {}, out)
    assert _png_size(out) == (800, 1100)
    assert out.stat().st_size > 5_000
    plot_run(tmp_path / "never-written.jsonl", {"evaluations": []}, out)  # overwrites in place
    assert _png_size(out) == (800, 1100)
