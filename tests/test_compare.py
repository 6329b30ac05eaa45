"""`fasteto compare` on hand-written run folders: the exact Markdown, --rows, -o, old summaries, and
errors that name the folder and the fix."""

from __future__ import annotations

import json

import pytest

from fasteto.cli import main
from fasteto.report import NOTE


def _row(label: str, rewards: dict[str, float] | None, ci: list[list[float]] | None) -> dict:
    """A SciWorld-seen row as a run writes it; `rewards=None` is a row of an old summary (no rewards,
    no intervals). The intervals are written by hand: compare shows the stored ones."""
    values = list((rewards or {"t": 0.0}).values())
    row = {"label": label, "env": "sciworld", "split": "seen",
           "average_reward_x100": 100 * sum(values) / len(values),
           "success_rate": sum(v == 1.0 for v in values) / len(values), "n": len(values)}
    if rewards is not None:
        row |= {"rewards": rewards, "ci95": {"average_reward_x100": ci[0], "success_rate": ci[1]}}
    return row


@pytest.fixture
def runs(tmp_path, monkeypatch):
    """runs/a (base, SFT on t1..t3), runs/b (SFT on t2..t4), runs/old (no per-task rewards)."""
    monkeypatch.chdir(tmp_path)
    folders = {
        "a": [_row("base", {"t1": 0.0, "t2": 0.0, "t3": 0.5}, [[0.0, 50.0], [0.0, 0.0]]),
              _row("SFT", {"t1": 0.0, "t2": 0.5, "t3": 1.0}, [[0.0, 100.0], [0.0, 1.0]])],
        "b": [_row("SFT", {"t2": 1.0, "t3": 1.0, "t4": 0.0}, [[0.0, 100.0], [0.0, 1.0]])],
        "old": [_row("SFT", None, None)],
    }
    for name, evaluations in folders.items():
        (tmp_path / "runs" / name).mkdir(parents=True)
        (tmp_path / "runs" / name / "summary.json").write_text(json.dumps({"evaluations": evaluations}))
    return tmp_path / "runs"


ROWS = (
    "## Rows\n\n"
    "| run: method | SciWorld seen |\n"
    "|---|---|\n"
    "| runs/a: base | 16.7 [0.0, 50.0] (0% [0, 0], n=3) |\n"
    "| runs/a: SFT | 50.0 [0.0, 100.0] (33% [0, 100], n=3) |\n"
    "| runs/b: SFT | 66.7 [0.0, 100.0] (67% [0, 100], n=3) |\n"
)


def test_compare_default_pairs_each_run_with_the_first(runs, capsys):
    # runs/b: SFT − runs/a: SFT on the shared t2, t3: reward x 100 differences 50 and 0 -> +25.0, and
    # success 1 and 0 -> +50 pp; with two tasks the interval is the range of the two differences.
    assert main(["compare", "runs/a/", "runs/b", "-o", "out/cmp.md"]) == 0
    expected = (
        ROWS + "\n## Paired differences\n\n"
        "Each later run minus the first (runs/a), for every method both have.\n\n"
        "| difference | SciWorld seen |\n"
        "|---|---|\n"
        "| runs/b: SFT − runs/a: SFT | +25.0 [0.0, 50.0] (+50 pp [0, 100], n=2 paired, 2 unpaired) |\n\n"
        "- runs/b: SFT − runs/a: SFT, SciWorld seen: 2 tasks paired; 1 only in runs/b: SFT, 1 only in "
        "runs/a: SFT\n\n" + NOTE + "\n"
    )
    assert capsys.readouterr().out == expected
    assert (runs.parent / "out" / "cmp.md").read_text() == expected
    assert [p.name for p in (runs.parent / "out").iterdir()] == ["cmp.md"]  # no temp file left


def test_compare_rows_picks_the_pairs(runs, capsys):
    # runs/b: SFT − runs/a: base on t2, t3: reward differences 100 and 50, success 1 and 1.
    assert main(["compare", "runs/a", "runs/b", "--rows", "a:base", "runs/b:SFT"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(ROWS)
    assert "Each row of --rows minus the first (runs/a: base).\n" in out
    assert "| runs/b: SFT − runs/a: base | +75.0 [50.0, 100.0] (+100 pp [100, 100], n=2 paired, " \
           "2 unpaired) |\n" in out


def test_compare_old_summary_renders_with_n_a(runs, capsys):
    assert main(["compare", "runs/old", "runs/b"]) == 0
    out = capsys.readouterr().out
    assert "| runs/old: SFT | 0.0 [n/a] (0% [n/a], n=1) |\n" in out
    assert "No pair of rows shares an environment and split with per-task rewards on both sides." in out
    assert ("Not compared, no per-task rewards (a summary written before they were kept): "
            "runs/b: SFT − runs/old: SFT, SciWorld seen.") in out


def test_compare_without_shared_methods_says_how_to_choose(runs, capsys):
    assert main(["compare", "runs/b"]) == 0
    assert "choose pairs with --rows RUN:LABEL RUN:LABEL" in capsys.readouterr().out


@pytest.mark.parametrize(("argv", "message"), [
    (["runs/a", "runs/missing"], "runs/missing: no such run folder"),
    (["runs/a", "runs/empty"], "runs/empty: no summary.json, so the run has not finished; rerun "
                               "`python -m fasteto.train --run_dir runs/empty`"),
    (["runs/bad"], "runs/bad/summary.json: not valid JSON"),
    (["runs/list"], "runs/list/summary.json: no 'evaluations' list"),
    (["runs/short"], "runs/short/summary.json: evaluations[0] lacks success_rate, n"),
    (["runs/a", "runs/a/"], "runs/a is given twice"),
    (["runs/a", "runs/b", "--rows", "runs/a:SFT"], "--rows needs at least two RUN:LABEL rows"),
    (["runs/a", "runs/b", "--rows", "c:SFT", "b:SFT"], "--rows 'c:SFT': no run named before the ':'"),
    (["runs/a", "runs/b", "--rows", "a:SFT", "b:ETO"], "runs/b has no method 'ETO'; it has SFT"),
])
def test_compare_errors_name_the_folder_and_the_fix(runs, capsys, argv, message):
    (runs / "empty").mkdir()
    (runs / "bad").mkdir()
    (runs / "bad" / "summary.json").write_text('{"evaluations": [')
    (runs / "list").mkdir()
    (runs / "list" / "summary.json").write_text("[]")
    (runs / "short").mkdir()
    (runs / "short" / "summary.json").write_text(json.dumps(
        {"evaluations": [{"label": "x", "env": "sciworld", "split": "seen", "average_reward_x100": 1}]}))
    assert main(["compare", *argv]) == 2
    assert message in capsys.readouterr().err
