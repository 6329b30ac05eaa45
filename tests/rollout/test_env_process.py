"""Environments in their own processes, K samples per task, and retried engine calls."""

from __future__ import annotations

import functools
import json
import os
import signal

import pytest
from test_explore import ReplayEngine, ToyEnv, toy_script

from fasteto.envs.base import EnvCrashedError
from fasteto.rollout.engine import GenerationConfig
from fasteto.rollout.env_process import ProcessEnv
from fasteto.rollout.explore import explore


def failing_factory():
    raise ValueError("no such data folder: /nowhere")


def test_same_answers_as_in_process():
    local, remote = ToyEnv(), ProcessEnv(ToyEnv)
    try:
        assert remote.pid != os.getpid()
        assert remote.prompt == local.prompt
        assert remote.reset("a") == local.reset("a") == "Task a"
        for reply in toy_script("wait", "win"):
            assert remote.step(reply) == local.step(reply)
        assert remote.trajectory(extra={"k": 1}) == local.trajectory(extra={"k": 1})
        assert remote.record_extra("a") == {"game_file": "games/a"}
    finally:
        remote.close()
    assert not remote._process.is_alive()


def test_errors_cross_the_pipe_and_a_dead_child_is_a_crash():
    env = ProcessEnv(failing_factory)
    with pytest.raises(ValueError, match="no such data folder"):
        env.reset("a")
    env.close()

    env = ProcessEnv(ToyEnv)
    env.reset("a")
    with pytest.raises(EnvCrashedError, match="toy engine died"):  # the env's own crash, pickled back
        env.step("Action: boom")
    os.kill(env.pid, signal.SIGKILL)
    with pytest.raises(EnvCrashedError, match=rf"pid {env.pid}\) ended during step\(\) with exit code -9"):
        env.step("Action: win")
    env.close()


def test_explore_over_processes_with_samples_and_resume(tmp_path):
    store = tmp_path / "s.jsonl"
    engine = ReplayEngine({"Task a": toy_script("win"), "Task b": toy_script("wait", "win")})
    gen = GenerationConfig(greedy=False, seed=3)
    report = explore(functools.partial(ProcessEnv, ToyEnv), engine, ["a", "b"], store, gen,
                     concurrency=4, progress=False, samples=2)
    assert [(t.id, t.extra["sample"], t.reward) for t in report.trajectories] == [
        ("a", 0, 1.0), ("a", 1, 1.0), ("b", 0, 1.0), ("b", 1, 1.0)]
    assert len(engine.calls[0]) == 4  # all four episodes in flight at once
    assert report.trajectories[0].extra == {"game_file": "games/a", "sample": 0}

    lines = store.read_text().splitlines(keepends=True)
    store.write_text("".join(lines[:-1]))  # the last episode lost
    again = explore(ToyEnv, ReplayEngine({}), ["a", "b"], store, gen, progress=False, samples=2)
    assert (again.new_episodes, again.resumed) == (1, 3)
    with pytest.raises(ValueError, match="samples must be ≥ 1"):
        explore(ToyEnv, engine, ["a"], store, gen, samples=0)


class FlakyEngine(ReplayEngine):
    """Raises on the calls whose numbers are in ``failures`` (counted from 0), like a dropped connection."""

    def __init__(self, scripts, failures):
        super().__init__(scripts)
        self.failures, self.count = set(failures), 0

    def generate(self, conversations, cfg):
        self.count += 1
        if self.count - 1 in self.failures:
            raise ConnectionError("server went away")
        return super().generate(conversations, cfg)


def test_engine_calls_are_retried_then_the_error_names_the_store(tmp_path):
    store = tmp_path / "s.jsonl"
    scripts = {"Task a": toy_script("win"), "Task b": toy_script("wait", "win")}
    engine = FlakyEngine(scripts, failures=[1])
    report = explore(ToyEnv, engine, ["a", "b"], store, GenerationConfig(), concurrency=2, progress=False)
    assert report.engine_retries == 1 and [t.reward for t in report.trajectories] == [1.0, 1.0]

    store.unlink()
    engine = FlakyEngine(scripts, failures=[1, 2, 3])
    with pytest.raises(RuntimeError, match=f"failed 3 times in a row; finished episodes are in {store}"):
        explore(ToyEnv, engine, ["a", "b"], store, GenerationConfig(), concurrency=2, progress=False)
    assert [line for line in store.read_text().splitlines() if '"a"' in line]  # a finished before


class ConstantEngine:
    def __init__(self):
        self.batch_sizes = []

    def generate(self, conversations, cfg):
        self.batch_sizes.append(len(conversations))
        return ["Thought: look.\nAction: look"] * len(conversations)


def test_other_engine_errors_are_not_retried(tmp_path):
    class Broken:
        calls = 0

        def generate(self, conversations, cfg):
            Broken.calls += 1
            raise IndexError("a bug")

    with pytest.raises(IndexError, match="a bug"):
        explore(ToyEnv, Broken(), ["a"], tmp_path / "s.jsonl", GenerationConfig(), progress=False)
    assert Broken.calls == 1


@pytest.mark.slow
def test_alfworld_games_step_in_parallel_processes(alfworld_data, tmp_path):
    pytest.importorskip("alfworld")
    from fasteto.envs import make_env

    games = make_env("alfworld", data=alfworld_data).task_ids("unseen")[:2]
    factory = functools.partial(ProcessEnv, functools.partial(make_env, "alfworld", data=alfworld_data))
    engine = ConstantEngine()
    report = explore(factory, engine, games, tmp_path / "s.jsonl", GenerationConfig(), concurrency=2,
                     progress=False)
    assert [t.id for t in report.trajectories] == games
    assert all(t.reward == 0.0 and len(t.conversations) == 3 + 2 * 40 - 1 for t in report.trajectories)
    assert engine.batch_sizes == [2] * 40  # both games in every round


def test_two_environments_share_the_slots_and_every_engine_call(tmp_path):
    from fasteto.rollout.explore import ExploreJob, explore_many

    made: list[str] = []

    def factory(name):
        def make():
            made.append(name)
            return ToyEnv()
        return make

    jobs = [ExploreJob(factory("left"), ["a", "b"], tmp_path / "left.jsonl"),
            ExploreJob(factory("right"), ["c"], tmp_path / "right.jsonl")]
    engine = ReplayEngine({"Task a": toy_script("win"), "Task b": toy_script("wait", "win"),
                           "Task c": toy_script("wait", "wait", "win")})
    left, right = explore_many(jobs, engine, GenerationConfig(), concurrency=2, progress=False)
    assert [t.id for t in left.trajectories] == ["a", "b"] and [t.id for t in right.trajectories] == ["c"]
    assert [m[-1]["value"] for m in engine.calls[0]] == ["Task a", "Task c"]  # both jobs in round one
    assert (left.env_steps, right.env_steps) == (3, 3) and (left.new_episodes, right.new_episodes) == (2, 1)
    assert sorted(made) == ["left", "right"]  # the slot that finished 'a' took 'b' with left's env
    assert [r["id"] for r in map(json.loads, (tmp_path / "right.jsonl").read_text().splitlines())] == ["c"]


def test_max_steps_ends_episodes_early_with_the_reward_reached(tmp_path):
    engine = ReplayEngine({"Task a": toy_script("wait", "win"), "Task b": toy_script("win")})
    report = explore(ToyEnv, engine, ["a", "b"], tmp_path / "s.jsonl", GenerationConfig(), progress=False,
                     max_steps=1)
    assert [(t.id, t.reward, len(t.conversations)) for t in report.trajectories] == [("a", 0.0, 4),
                                                                                    ("b", 1.0, 4)]
    assert report.env_steps == 2
    with pytest.raises(ValueError, match="max_steps must be ≥ 1"):
        explore(ToyEnv, engine, ["a"], tmp_path / "t.jsonl", GenerationConfig(), max_steps=0)
