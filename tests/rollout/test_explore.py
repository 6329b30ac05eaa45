"""The explorer: a toy environment for the bookkeeping (slots, crashes, resume), the real ScienceWorld engine
for the stored trajectories, and one end-to-end run of the real TransformersEngine."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
from tiny import byte_tokenizer, tiny_llama

from fasteto.data.formats import read_jsonl_tolerant, read_trajectories
from fasteto.data.types import GPT, HUMAN, Message, Trajectory
from fasteto.envs.base import ACK, INVALID_FORMAT, EngineCrashed, TextEnv, load_prompt
from fasteto.rollout.engine import GenerationConfig, TransformersEngine
from fasteto.rollout.expert import solve
from fasteto.rollout.explore import EvalResult, evaluate, explore, summarise

CONTEXT_LEN = len(load_prompt("sciworld").context(""))  # messages the engine reads before the episode


class ReplayEngine:
    """A fake policy: replies from a script per task message (``fallback`` once it runs out).

    It records every call's conversations, so tests can see batch sizes and what the model was shown.
    """

    def __init__(self, scripts: dict[str, list[str]], fallback: str = "Thought: hmm.\nAction: look around"):
        self.scripts = scripts
        self.fallback = fallback
        self.calls: list[list[list[Message]]] = []
        self.configs: list[GenerationConfig] = []

    def generate(self, conversations: list[list[Message]], cfg: GenerationConfig) -> list[str]:
        self.calls.append(conversations)
        self.configs.append(cfg)
        replies = []
        for conv in conversations:
            task, turn = conv[CONTEXT_LEN - 1]["value"], (len(conv) - CONTEXT_LEN) // 2
            script = self.scripts.get(task, [])
            replies.append(script[turn] if turn < len(script) else self.fallback)
        return replies

    def tasks_started(self) -> list[str]:
        """Task messages of the conversations seen at their first turn, in order."""
        return [c[-1]["value"] for call in self.calls for c in call if len(c) == CONTEXT_LEN]


# ------------------------------------------------------------------------------------------ toy env


class ToyEnv(TextEnv):
    """Task ``t`` says "Task t"; action ``win`` wins, ``boom`` kills the engine, anything else does
    nothing; 3 steps at most. ``reset_crashes[t]`` resets of task ``t`` crash first (shared, counted down).
    """

    name = "sciworld"  # borrows ScienceWorld's prompt file
    reset_crashes: dict[str, int] = {}
    lock = threading.Lock()

    def __init__(self):
        super().__init__(max_restarts=0)  # any engine death is an EnvCrashedError at once
        self.closed = False

    def _start(self) -> None:
        pass

    def _load(self, task_id: str) -> str:
        with self.lock:
            if self.reset_crashes.get(task_id, 0) > 0:
                self.reset_crashes[task_id] -= 1
                raise EngineCrashed("toy engine died on load")
        return f"Task {task_id}"

    def _act(self, action: str) -> tuple[str, float, bool, bool]:
        if action == "boom":
            raise EngineCrashed("toy engine died on an action")
        won = action == "win"
        return ("You won." if won else "Nothing happens."), float(won), won, False

    def max_steps(self, task_id: str) -> int:
        return 3

    def record_extra(self, task_id: str) -> dict:
        return {"game_file": f"games/{task_id}"}

    def close(self) -> None:
        self.closed = True


@pytest.fixture
def toy_envs(monkeypatch):
    """A factory of ToyEnvs that keeps every env it made."""
    monkeypatch.setattr(ToyEnv, "reset_crashes", {})
    made: list[ToyEnv] = []

    def make() -> ToyEnv:
        made.append(ToyEnv())
        return made[-1]

    make.made = made
    return make


def toy_script(*actions: str) -> list[str]:
    return [f"Thought: try.\nAction: {a}" for a in actions]


def test_toy_slots_refill_and_results_in_task_order(toy_envs, tmp_path):
    engine = ReplayEngine({"Task a": toy_script("wait", "win"), "Task b": toy_script("win"),
                           "Task c": toy_script("win")}, fallback="no action here")
    store = tmp_path / "explored.jsonl"
    report = explore(toy_envs, engine, ["a", "b", "c", "d", "b"], store, GenerationConfig(),
                     concurrency=2, progress=False)
    assert [t.id for t in report.trajectories] == ["a", "b", "c", "d"]
    assert [t.reward for t in report.trajectories] == [1.0, 1.0, 1.0, 0.0]
    # Round 1: a, b; b wins, c takes its slot; round 2: a (wins), c (wins); d alone for its 3 steps.
    assert [len(call) for call in engine.calls] == [2, 2, 1, 1, 1]
    assert engine.tasks_started() == ["Task a", "Task b", "Task c", "Task d"]
    assert (report.new_episodes, report.resumed, report.crashes, report.env_steps) == (4, 0, 0, 7)
    assert len(toy_envs.made) == 2 and all(env.closed for env in toy_envs.made)
    d = report.trajectories[3]
    assert d.extra == {"game_file": "games/d"} and d.conversations[2:] == [
        {"from": HUMAN, "value": "Task d"}, {"from": GPT, "value": "no action here"},
        {"from": HUMAN, "value": INVALID_FORMAT}, {"from": GPT, "value": "no action here"},
        {"from": HUMAN, "value": INVALID_FORMAT}, {"from": GPT, "value": "no action here"}]
    assert [json.loads(line)["id"] for line in store.read_text().splitlines()] == ["b", "a", "c", "d"]


def test_toy_crashes_are_retried_then_recorded_as_null(toy_envs, tmp_path):
    ToyEnv.reset_crashes["f"] = 1  # flaky: its first reset dies, the retry wins
    engine = ReplayEngine({"Task f": toy_script("win"), "Task x": toy_script("wait", "boom")})
    report = explore(toy_envs, engine, ["x", "f"], tmp_path / "s.jsonl", GenerationConfig(),
                     concurrency=2, progress=False)
    x, f = report.trajectories
    assert f.reward == 1.0 and x.reward is None
    assert report.crashes == 1 + 3 and report.new_episodes == 2  # x: first try and both retries died
    # x's last attempt as far as it got: the step that died is not in it, the last observation is dropped.
    assert x.conversations == [{"from": HUMAN, "value": load_prompt("sciworld").instruction},
                               {"from": GPT, "value": ACK}, {"from": HUMAN, "value": "Task x"},
                               {"from": GPT, "value": toy_script("wait")[0]}]
    assert x.extra == {"game_file": "games/x"}
    assert all(env.closed for env in toy_envs.made) and len(toy_envs.made) == 2 + 3  # a fresh env per retry
    assert summarise(report.trajectories) == EvalResult(average_reward_x100=50.0, success_rate=0.5, n=2)


def test_toy_reset_crashes_exhausted(toy_envs, tmp_path):
    ToyEnv.reset_crashes["z"] = 3
    report = explore(toy_envs, ReplayEngine({}), ["z"], tmp_path / "s.jsonl", GenerationConfig(),
                     concurrency=1, progress=False)
    [z] = report.trajectories
    assert z.reward is None and len(z.conversations) == 2 and report.crashes == 3
    assert report.env_steps == 0 and read_trajectories(tmp_path / "s.jsonl", "explored")[0].id == "z"


def test_toy_sampling_seed_moves_per_round_and_evaluate_is_greedy(toy_envs, tmp_path):
    engine = ReplayEngine({"Task a": toy_script("wait", "win")})
    explore(toy_envs, engine, ["a"], tmp_path / "e.jsonl", GenerationConfig(greedy=False, seed=10),
            progress=False)
    assert [c.seed for c in engine.configs] == [10, 11]
    engine = ReplayEngine({"Task a": toy_script("win"), "Task b": toy_script("wait")})
    result = evaluate(toy_envs, engine, ["a", "b"], tmp_path / "v.jsonl",
                      GenerationConfig(max_new_tokens=7, greedy=False, seed=3), progress=False)
    assert result == EvalResult(average_reward_x100=50.0, success_rate=0.5, n=2)
    assert {(c.greedy, c.max_new_tokens, c.seed) for c in engine.configs} == {(True, 7, 3)}


def test_summarise_counts_partial_rewards_and_nothing():
    trajs = [Trajectory(id=i, conversations=[], reward=r) for i, r in enumerate([1.0, 0.25, 0.999, 0.0])]
    assert summarise(trajs) == EvalResult(average_reward_x100=pytest.approx(56.225), success_rate=0.25, n=4)
    assert summarise([]) == EvalResult(0.0, 0.0, 0)


# ---------------------------------------------------------------------------------- ScienceWorld

TASKS = ["11_0", "21_52"]  # find an animal (15-step limit), lifespans (12-step limit): short plans


@pytest.fixture
def borrowed_sciworld(sciworld_env, monkeypatch):
    """The session's ScienceWorld env, which ``explore`` may use but must not really close."""
    monkeypatch.setattr(sciworld_env, "close", lambda: None)
    return sciworld_env


@pytest.fixture(scope="module")
def expert_plans(sciworld_env) -> dict[str, list[str]]:
    """Task message -> the expert's replies, for TASKS."""
    plans = {}
    for task_id in TASKS:
        trajectory, _ = solve(sciworld_env, task_id)
        plans[trajectory.conversations[2]["value"]] = [m["value"] for m in trajectory.conversations[3::2]]
    return plans


def check_eto_layout(trajectory: Trajectory, prompt_instruction: str) -> None:
    conv = trajectory.conversations
    assert conv[0] == {"from": HUMAN, "value": prompt_instruction} and conv[1] == {"from": GPT, "value": ACK}
    assert [m["from"] for m in conv] == [HUMAN, GPT] * (len(conv) // 2) + [HUMAN] * (len(conv) % 2)
    assert conv[-1]["from"] == GPT  # the trailing observation is dropped
    assert all(m["value"].startswith("Observation: ") for m in conv[4::2])  # no in-context example


@pytest.mark.slow
def test_sciworld_two_in_flight_then_resume(borrowed_sciworld, expert_plans, tmp_path):
    from fasteto.envs.sciworld import SciWorldEnv

    envs = [borrowed_sciworld, SciWorldEnv()]
    engine = ReplayEngine(expert_plans)
    store = tmp_path / "explored.jsonl"
    first = explore(lambda: envs.pop(0), engine, TASKS, store, GenerationConfig(), concurrency=2,
                    progress=False)
    assert len(engine.calls[0]) == 2  # both episodes in flight from the first round
    assert [t.id for t in first.trajectories] == TASKS
    assert [t.reward for t in first.trajectories] == [1.0, 1.0]
    instruction = load_prompt("sciworld").instruction
    for trajectory, replies in zip(first.trajectories, expert_plans.values(), strict=True):
        check_eto_layout(trajectory, instruction)
        stored = [m["value"] for m in trajectory.conversations[3::2]]
        assert stored == replies[:len(stored)]  # 21_52 is won before its plan's last "wait1"
        assert trajectory.conversations[2]["value"] in expert_plans
    assert (first.new_episodes, first.resumed, first.crashes) == (2, 0, 0)
    assert first.env_steps == sum((len(t.conversations) - 2) // 2 for t in first.trajectories)

    # Killed mid-write of the last record: that record is lost, the rest is kept; only it is replayed.
    lines = store.read_bytes().splitlines(keepends=True)
    store.write_bytes(lines[0] + lines[1][: len(lines[1]) // 2])
    lost = json.loads(lines[1])["id"]
    engine = ReplayEngine(expert_plans)
    again = explore(lambda: borrowed_sciworld, engine, TASKS, store, GenerationConfig(), concurrency=2,
                    progress=False)
    assert (again.new_episodes, again.resumed) == (1, 1) and len(engine.tasks_started()) == 1
    assert again.trajectories == first.trajectories and len(read_jsonl_tolerant(store)) == 2
    assert json.loads(store.read_bytes().splitlines()[-1])["id"] == lost

    # A record deleted: only its task is played again.
    store.write_bytes(b"".join(store.read_bytes().splitlines(keepends=True)[1:]))
    engine = ReplayEngine(expert_plans)
    third = explore(lambda: borrowed_sciworld, engine, TASKS, store, GenerationConfig(), progress=False)
    assert (third.new_episodes, third.resumed) == (1, 1) and third.trajectories == first.trajectories
    done = explore(lambda: borrowed_sciworld, ReplayEngine({}), TASKS, store, GenerationConfig(),
                   progress=False)
    assert (done.new_episodes, done.resumed, done.env_steps) == (0, 2, 0)


@pytest.mark.slow
def test_sciworld_wrong_actions_score_below_one(borrowed_sciworld, tmp_path):
    engine = ReplayEngine({})  # always "look around"
    report = explore(lambda: borrowed_sciworld, engine, ["11_0"], tmp_path / "s.jsonl", GenerationConfig(),
                     progress=False)
    [t] = report.trajectories
    assert 0.0 <= t.reward < 1.0 and report.env_steps == 15  # task-3-find-animal's step limit
    assert len(t.conversations) == 3 + 2 * 15 - 1
    check_eto_layout(t, load_prompt("sciworld").instruction)


@pytest.mark.slow
def test_sciworld_with_a_tiny_random_transformers_policy(borrowed_sciworld, one_thread, tmp_path):
    tokenizer = byte_tokenizer()
    engine = TransformersEngine(tiny_llama(len(tokenizer), hidden_size=48), tokenizer, batch_size=2)
    store: Path = tmp_path / "s.jsonl"
    result = evaluate(lambda: borrowed_sciworld, engine, ["11_0"], store, GenerationConfig(max_new_tokens=8),
                      progress=False)
    assert result == EvalResult(average_reward_x100=0.0, success_rate=0.0, n=1)
    [t] = read_trajectories(store, "explored")
    assert t.id == "11_0" and t.reward == 0.0 and len(t.conversations) == 3 + 2 * 15 - 1
    assert all(m["value"] == INVALID_FORMAT for m in t.conversations[4::2])  # garbage has no action
