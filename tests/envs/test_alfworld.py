"""ALFWorld through TextWorld's engine, on the real games in ../shared/data/alfworld."""

from __future__ import annotations

import json
import shutil

import pytest

from fasteto.envs.alfworld import read_gt_traj
from fasteto.envs.base import INVALID_FORMAT, EnvSetupError, parse_action
from fasteto.rollout.expert import solve

pytestmark = pytest.mark.slow

# Three task types whose gt_traj.json wins (and whose planner solves quickly).
GAMES = ["look_at_obj_in_light-AlarmClock-None-DeskLamp-302/trial_T20190908_192756_298295",
         "pick_two_obj_and_place-AlarmClock-None-Desk-307/trial_T20190907_013752_725369",
         "pick_clean_then_place_in_recep-Pan-None-CounterTop-22/trial_T20190910_161415_317849"]


def test_splits_are_the_solvable_games(alfworld_env):
    assert [len(alfworld_env.task_ids(s)) for s in ("train", "seen", "unseen")] == [240, 140, 134]
    assert alfworld_env.task_ids("valid_unseen") == alfworld_env.task_ids("unseen")


def test_unseen_split_matches_eto_list(alfworld_env):
    from importlib import resources

    eto = resources.files("fasteto.envs").joinpath("splits/alfworld/gamefile_id.txt").read_text().split()
    assert sorted(eto) == alfworld_env.task_ids("unseen")


@pytest.mark.parametrize("task_id", GAMES)
def test_default_expert_replays_gt_traj_to_a_win(alfworld_env, alfworld_data, task_id):
    trajectory, reason = solve(alfworld_env, task_id)
    assert reason is None and trajectory.reward == 1.0
    assert trajectory.extra == {"game_file": f"json_2.1.1/train/{task_id}/game.tw-pddl",
                                "expert_source": "gt_traj"}
    conv = trajectory.conversations
    shipped = read_gt_traj(alfworld_data / "json_2.1.1" / "train" / task_id / "gt_traj.json")
    assert [parse_action(m["value"]) for m in conv[3::2]] == shipped
    assert conv[2]["value"].startswith("You are in the middle of a room.")
    assert "Your task is to:" in conv[2]["value"] and "Welcome" not in conv[2]["value"]
    assert conv[-1]["from"] == "gpt"
    assert not any("You arrive at loc" in m["value"] for m in conv)


def test_textworld_speedups_leave_every_observation_unchanged(alfworld_env, alfworld_data, monkeypatch):
    """Each game's shipped expert actions plus actions that fail, played with TextWorld's own functions
    and with the patches: the same observations, rewards and ends. A game start translates the PDDL
    problem twice (as is, and for replanning) instead of four times, and a second start of the same game
    translates afresh."""
    from fasteto.envs import textworld_speedups

    def play():
        seen = []
        for task_id in [*GAMES, GAMES[0]]:
            seen.append(alfworld_env.reset(task_id))
            shipped = read_gt_traj(alfworld_data / "json_2.1.1" / "train" / task_id / "gt_traj.json")
            for action in ["look", "inventory", "take sky 1 from moon 2", "jump", *shipped[:8]]:
                seen.append(alfworld_env.step(f"Thought: next.\nAction: {action}"))
        return seen

    import sys

    import textworld.envs.pddl.textgen as textgen

    monkeypatch.setattr(sys, "argv", ["translate.py", "domain", "task"])  # its options module parses argv
    from fast_downward.translate import translate

    calls = []
    pddl_to_sas = translate.pddl_to_sas
    monkeypatch.setattr(translate, "pddl_to_sas", lambda task: calls.append(task) or pddl_to_sas(task))
    assert textworld_speedups.install()  # AlfWorldEnv installs it; idempotent
    patched = play()
    patched_calls = len(calls)
    with textworld_speedups.unpatched():
        assert textgen._parse_and_convert.__module__ == "textworld.envs.pddl.textgen"
        assert textgen.copy_context.__module__ == "textworld.envs.pddl.textgen"
        plain = play()
    assert textgen._parse_and_convert.__module__ == "fasteto.envs.textworld_speedups"
    assert patched == plain and len(plain) > 40
    assert any(step.won for step in plain[1:] if not isinstance(step, str))  # a shipped plan that wins
    starts = len(GAMES) + 1
    assert (patched_calls, len(calls) - patched_calls) == (2 * starts, 4 * starts)


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

    with AlfWorldEnv(alfworld_data, expert="planner", expert_timeout=0.01) as env:
        with pytest.raises(ValueError) as exc:
            env.expert_actions(GAMES[0])
        assert str(exc.value) == "planner: no plan within 0 s"
    with AlfWorldEnv(alfworld_data, expert="handcoded", expert_timeout=0.01) as env:
        assert solve(env, GAMES[0]) == (None, "handcoded: no plan: no plan within 0 s")


def test_unknown_expert_kind_names_the_choices(alfworld_data):
    from fasteto.envs.alfworld import AlfWorldEnv

    choices = "choose one of auto, gt_traj, handcoded, planner"
    with pytest.raises(ValueError, match=f"unknown expert 'oracle'; {choices}"):
        AlfWorldEnv(alfworld_data, expert="oracle")


def test_read_gt_traj_and_its_errors(tmp_path):
    path = tmp_path / "gt_traj.json"
    path.write_text(json.dumps([{"from": "human", "value": "-= Welcome =-\n\nroom"},
                                {"from": "gpt", "value": "go to desk 1 "},
                                {"from": "human", "value": "On the desk 1, you see nothing."},
                                {"from": "gpt", "value": "open drawer 1"}]))
    assert read_gt_traj(path) == ["go to desk 1", "open drawer 1"]
    with pytest.raises(ValueError, match=f"^{tmp_path}/nope.json is missing"):
        read_gt_traj(tmp_path / "nope.json")
    for text, error in [
        ("[{", "not valid JSON"),
        ("{}", "expected a non-empty JSON list"),
        ('[{"from": "gpt", "value": "go to desk 1"}]',
         'message 0 is {"from": "gpt", "value": "go to desk 1"}; '
         'expected {"from": "human", "value": <text>}'),
        ('[{"from": "human", "value": "room"}]', "no actions"),
        ('[{"from": "human", "value": "room"}, {"from": "gpt", "value": " "}]', "an empty action"),
    ]:
        path.write_text(text)
        with pytest.raises(ValueError, match=f"^{path}: ") as exc:
            read_gt_traj(path)
        assert error in str(exc.value)


def _one_game_folder(alfworld_data, tmp_path, task_id):
    """A data folder holding one train game, without its gt_traj.json."""
    game = tmp_path / "json_2.1.1" / "train" / task_id
    game.mkdir(parents=True)
    for name in ("game.tw-pddl", "traj_data.json"):
        shutil.copy(alfworld_data / "json_2.1.1" / "train" / task_id / name, game / name)
    return game


def test_malformed_gt_traj_is_named_and_auto_falls_back_to_handcoded(alfworld_data, tmp_path):
    from fasteto.envs.alfworld import AlfWorldEnv

    game = _one_game_folder(alfworld_data, tmp_path, GAMES[0])
    (game / "gt_traj.json").write_text('[{"from": "human"')
    with AlfWorldEnv(tmp_path, expert="gt_traj") as env:
        trajectory, reason = solve(env, GAMES[0])
    assert trajectory is None
    assert reason.startswith(f"gt_traj: no plan: {game / 'gt_traj.json'}: not valid JSON")
    (game / "gt_traj.json").unlink()
    with AlfWorldEnv(tmp_path) as env:
        trajectory, reason = solve(env, GAMES[0])
    assert reason is None and trajectory.extra["expert_source"] == "handcoded"


def test_handcoded_expert_is_reproducible(alfworld_data):
    from fasteto.envs.alfworld import AlfWorldEnv

    with AlfWorldEnv(alfworld_data, expert="handcoded") as env:
        first = env.expert_actions(GAMES[0])
        assert first == env.expert_actions(GAMES[0])
        env.reset(GAMES[0])
        for action in first:
            step = env.step(f"Thought: t\nAction: {action}")
        assert step.won
