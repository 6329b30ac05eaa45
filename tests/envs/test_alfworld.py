"""ALFWorld through TextWorld's engine, on the real games in ../shared/data/alfworld."""

from __future__ import annotations

import pytest

from fasteto.envs.base import INVALID_FORMAT, EnvSetupError
from fasteto.rollout.expert import solve

pytestmark = pytest.mark.slow

# Two task types whose planner solves quickly.
GAMES = ["look_at_obj_in_light-AlarmClock-None-DeskLamp-302/trial_T20190908_192756_298295",
         "pick_two_obj_and_place-AlarmClock-None-Desk-307/trial_T20190907_013752_725369"]


def test_splits_are_the_solvable_games(alfworld_env):
    assert [len(alfworld_env.task_ids(s)) for s in ("train", "seen", "unseen")] == [240, 140, 134]
    assert alfworld_env.task_ids("valid_unseen") == alfworld_env.task_ids("unseen")


def test_unseen_split_matches_eto_list(alfworld_env):
    from importlib import resources

    eto = resources.files("fasteto.envs").joinpath("splits/alfworld/gamefile_id.txt").read_text().split()
    assert sorted(eto) == alfworld_env.task_ids("unseen")


@pytest.mark.parametrize("task_id", GAMES)
def test_expert_replays_to_a_win(alfworld_env, task_id):
    trajectory, reason = solve(alfworld_env, task_id)
    assert reason is None and trajectory.reward == 1.0
    assert trajectory.extra == {"game_file": f"json_2.1.1/train/{task_id}/game.tw-pddl"}
    conv = trajectory.conversations
    assert conv[2]["value"].startswith("You are in the middle of a room.")
    assert "Your task is to:" in conv[2]["value"] and "Welcome" not in conv[2]["value"]
    assert conv[-1]["from"] == "gpt"
    assert not any("You arrive at loc" in m["value"] for m in conv)


def test_unparsable_reply_and_step_limit(alfworld_env):
    alfworld_env.reset(GAMES[0])
    first = alfworld_env.step("no action here")
    assert (first.observation, first.steps, first.done) == (INVALID_FORMAT, 1, False)
    steps = [alfworld_env.step("Thought: hm\nAction: look") for _ in range(39)]
    assert [s.done for s in steps] == [False] * 38 + [True]
    assert steps[-1].reward == 0.0 and steps[-1].steps == 40


def test_missing_data_folder_says_how_to_get_it(tmp_path, monkeypatch):
    from fasteto.envs.alfworld import AlfWorldEnv

    with pytest.raises(EnvSetupError, match="alfworld-download"):
        AlfWorldEnv(tmp_path / "nowhere")
    monkeypatch.setenv("ALFWORLD_DATA", str(tmp_path))
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(EnvSetupError, match=str(tmp_path)):
        AlfWorldEnv()


def test_unknown_game_is_named(alfworld_env):
    with pytest.raises(ValueError, match="unknown task id 'nope/trial'"):
        alfworld_env.reset("nope/trial")


def test_expert_time_budget_is_enforced_and_reported(alfworld_data):
    from fasteto.envs.alfworld import AlfWorldEnv

    with AlfWorldEnv(alfworld_data, expert="auto", expert_timeout=0.01) as env:
        with pytest.raises(ValueError) as exc:
            env.expert_actions(GAMES[0])
    assert str(exc.value) == "planner: no plan within 0 s; hand-coded: no plan within 0 s"


def test_handcoded_expert_is_reproducible(alfworld_data):
    from fasteto.envs.alfworld import AlfWorldEnv

    with AlfWorldEnv(alfworld_data, expert="handcoded") as env:
        first = env.expert_actions(GAMES[0])
        assert first == env.expert_actions(GAMES[0])
        env.reset(GAMES[0])
        for action in first:
            step = env.step(f"Thought: t\nAction: {action}")
        assert step.won
