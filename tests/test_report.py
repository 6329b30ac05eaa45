"""Tests for fasteto.report: the exact results table, and PNGs from real, empty and truncated logs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fasteto.report import plot_run, read_metrics, results_table

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


def test_results_table_exact():
    # "base" has no ALFWorld unseen result: the cell must read "–"; 61.25 is an exact tie that
    # Python rounds half-to-even (61.2); 2/3 success shows as 67%.
    expected = (
        "| method | SciWorld seen | ALFWorld unseen |\n"
        "|---|---|---|\n"
        "| base | 3.8 (0%, n=5) | – |\n"
        "| SFT | 61.2 (40%, n=5) | 66.7 (67%, n=3) |\n"
        "| ETO iteration 1 | 73.8 (60%, n=5) | 100.0 (100%, n=3) |"
    )
    assert results_table(SUMMARY) == expected


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
    assert plot_run(metrics, SUMMARY, out) == out
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
