"""ScienceWorld through its real simulator (the jar, on Java 17)."""

from __future__ import annotations

import pytest

from fasteto.envs.base import INVALID_FORMAT, EnvSetupError
from fasteto.rollout.expert import solve

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("task_id", ["11_0", "21_52", "9_412"])  # find-animal, lifespan, conductivity
def test_expert_replays_to_full_reward(sciworld_env, task_id):
    trajectory, reason = solve(sciworld_env, task_id)
    assert reason is None and trajectory is not None
    assert trajectory.reward == 1.0 and trajectory.id == task_id
    conv = trajectory.conversations
    assert [m["from"] for m in conv] == ["human", "gpt"] * (len(conv) // 2)
    assert conv[0]["value"] == sciworld_env.prompt.instruction and conv[1]["value"] == "OK"
    assert conv[2]["value"].startswith("Your task is to")
    assert all(m["value"].startswith("Observation: ") for m in conv[4::2])
    assert all(m["value"].startswith("Thought: ") for m in conv[3::2])


def test_unparsable_reply_costs_a_step(sciworld_env):
    sciworld_env.reset("11_0")
    step = sciworld_env.step("I think I will look around.")
    assert (step.observation, step.steps, step.action, step.done, step.reward) == (
        INVALID_FORMAT, 1, None, False, 0.0)
    assert sciworld_env.step("Thought: ok\nAction: look around").steps == 2


def test_step_limit_ends_the_episode(sciworld_env):
    limit = sciworld_env.max_steps("11_0")
    assert limit == 15  # ETO's max_steps.json for task-3-find-animal
    sciworld_env.reset("11_0")
    steps = [sciworld_env.step("Thought: wait\nAction: look around") for _ in range(limit)]
    assert [s.done for s in steps] == [False] * (limit - 1) + [True]
    with pytest.raises(RuntimeError, match="after the episode ended"):
        sciworld_env.step("Action: look around")
    assert len(sciworld_env.trajectory().conversations) == 3 + 2 * limit - 1


def test_wrong_focus_loses_with_reward_kept_in_range(sciworld_env):
    sciworld_env.reset("11_0")
    step = sciworld_env.step("Thought: hm\nAction: focus on air")
    assert step.done and not step.won and 0.0 <= step.reward <= 1.0


def test_killed_jvm_is_restarted_and_the_episode_goes_on(sciworld_env):
    actions = sciworld_env.expert_actions("9_412")
    sciworld_env.reset("9_412")
    half = len(actions) // 2
    for action in actions[:half]:
        sciworld_env.step(f"Thought: the next step.\nAction: {action}")
    restarts = sciworld_env.restarts
    jvm = sciworld_env.jvm_process()
    jvm.kill()  # SIGKILL
    jvm.wait(timeout=60)
    for action in actions[half:]:
        step = sciworld_env.step(f"Thought: the next step.\nAction: {action}")
        if step.done:
            break
    assert sciworld_env.restarts == restarts + 1
    assert step.won and step.reward == 1.0 and step.steps > half


def test_missing_java_says_how_to_install_it(monkeypatch):
    from fasteto.envs.sciworld import SciWorldEnv

    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(EnvSetupError, match="openjdk-17"):
        SciWorldEnv()
