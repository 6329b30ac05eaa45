"""Expert trajectories from the engines' own solvers: parallel, cached per task, resumable."""

from __future__ import annotations

import json

import pytest

from fasteto.cli import main
from fasteto.data.formats import read_trajectories, write_trajectories
from fasteto.data.types import Trajectory
from fasteto.rollout.expert import ExpertReport, cache_version, make_experts

pytestmark = pytest.mark.slow


def test_sciworld_experts_two_workers_then_cache_then_resume(sciworld_env, tmp_path):
    # The first three train tasks: two replay to reward 1, task-4-grow-fruit's plans are over its limit
    # (each tried with the looks the replay adds, then without).
    first = make_experts("sciworld", "train", limit=3, workers=2, cache_dir=tmp_path, progress=False)
    assert [t.id for t in first.trajectories] == ["9_412", "11_0"]
    assert first.dropped == {"15_53": "gold_short+looks: plan longer than the step limit (73 > 60); "
                                      "gold_short: plan longer than the step limit (73 > 60); "
                                      "gold+looks: plan longer than the step limit (79 > 60); "
                                      "gold: plan longer than the step limit (79 > 60)"}
    assert [t.extra["expert_source"] for t in first.trajectories] == ["gold_short+looks", "gold_short+looks"]
    assert first.from_cache == 0 and all(t.reward == 1.0 for t in first.trajectories)

    again = make_experts("sciworld", "train", limit=3, cache_dir=tmp_path, progress=False)
    assert again.from_cache == 3
    assert again.trajectories == first.trajectories and again.dropped == first.dropped

    folder = tmp_path / "expert" / cache_version("sciworld") / "sciworld" / "train"
    (folder / "11_0.json").unlink()  # as if killed before this task finished
    resumed = make_experts("sciworld", "train", limit=3, workers=1, cache_dir=tmp_path, progress=False)
    assert resumed.from_cache == 2 and resumed.trajectories == first.trajectories
    assert json.loads((folder / "11_0.json").read_text())["dropped"] is None


def test_expert_cli_writes_an_sft_file(sciworld_env, tmp_path, capsys):
    out = tmp_path / "experts.json"
    code = main(["expert", "--env", "sciworld", "--split", "seen", "--limit", "2", "--workers", "1",
                 "--cache-dir", str(tmp_path / "cache"), "-o", str(out)])
    assert code == 0
    items = read_trajectories(out, "sft")
    printed = capsys.readouterr().out
    assert f"wrote {len(items)} expert trajectories" in printed and "of 2 tasks kept" in printed
    assert all(t.reward == 1.0 and t.conversations[-1]["from"] == "gpt" for t in items)


def test_alfworld_experts_carry_their_game_file_and_source(alfworld_data, tmp_path):
    report = make_experts("alfworld", "train", limit=1, workers=1, cache_dir=tmp_path,
                          env_kwargs={"data": str(alfworld_data)}, progress=False)
    [item] = report.trajectories
    assert item.extra == {"game_file": f"json_2.1.1/train/{item.id}/game.tw-pddl", "expert_source": "gt_traj"}
    assert item.reward == 1.0 and not report.dropped
    assert "  kept: 1 x gt_traj" in report.summary().splitlines()
    out = tmp_path / "experts.json"
    write_trajectories(out, report.trajectories, "sft")
    keys = ["id", "game_file", "expert_source", "conversations", "reward"]
    assert list(json.loads(out.read_text())[0]) == keys
    assert read_trajectories(out, "sft") == report.trajectories


def test_report_counts_sources_and_groups_drop_reasons():
    kept = [Trajectory(i, [], 1.0, {"expert_source": source})
            for i, source in enumerate(["gt_traj", "handcoded", "gt_traj"])]
    report = ExpertReport(trajectories=kept, dropped={
        "a": "gt_traj: plan longer than the step limit (43 > 40); handcoded: no plan: expert gave up "
             "(Timeout)",
        "b": "gt_traj: plan longer than the step limit (93 > 40); handcoded: no plan: expert gave up "
             "(Timeout), plan of 48 steps is over the 40-step limit",
        "c": "gold: replay ended below reward 1 (0.50)",
        "d": "engine crashed repeatedly (not cached, a rerun retries it)"})
    assert report.sources() == {"gt_traj": 2, "handcoded": 1}
    assert report.drop_reasons() == {"gt_traj: plan longer than the step limit; handcoded: no plan": 2,
                                      "gold: replay ended below reward 1": 1, "engine crashed repeatedly": 1}
    assert report.summary().splitlines()[1:4] == [
        "  kept: 2 x gt_traj", "  kept: 1 x handcoded",
        "  dropped: 2 x gt_traj: plan longer than the step limit; handcoded: no plan"]


def test_cache_key_fills_defaults_and_ignores_the_data_folder():
    assert cache_version("alfworld") == cache_version("alfworld", {"expert": "auto", "data": "/somewhere"})
    assert cache_version("alfworld", {"expert": "planner"}) != cache_version("alfworld")
    assert cache_version("alfworld", {"expert": "gt_traj"}) != cache_version("alfworld")
    assert cache_version("sciworld") == cache_version("sciworld", {"max_restarts": 9})
