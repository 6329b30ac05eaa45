"""The one small interface that rollout drives, and the ETO protocol every environment shares.

An episode::

    task_message = env.reset(task_id)          # the task, as the model sees it
    while True:
        step = env.step(model_reply)           # the raw reply: "Thought: ...\\nAction: ..."
        if step.done:
            break
    trajectory = env.trajectory()              # ETO's stored layout, ready for an SFT/explored file

What this module owns, so that each engine file only loads tasks and applies actions:
- parsing ``Action:`` out of a reply (a reply without one costs a step and says so);
- the per-task step limit;
- the reward: the best score seen in the episode, in [0, 1];
- the conversation in ETO's stored layout (instruction exchange, task, replies, observations);
- recovery from a dead engine process: restart it, replay the episode's actions, go on.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import resources

from fasteto.data.types import GPT, HUMAN, Message, Trajectory, example_message, message

ACK = "OK"
_ACTION = re.compile(r"Action:[ \t]*(.*)")
INVALID_FORMAT = (
    "Observation: Invalid format. Your reply must contain a line 'Action: <your next action>', "
    "after 'Thought: <your thoughts>'."
)


class EnvSetupError(RuntimeError):
    """An environment cannot start: a missing program or data folder. The message says the fix."""


class EngineCrashed(RuntimeError):
    """The engine process died under an action. Raised by engines; the episode then restarts it."""


class EnvCrashedError(RuntimeError):
    """The engine kept dying: the episode was retried ``max_restarts`` times and gave up."""


@dataclass(frozen=True)
class Step:
    """What one reply did.

    ``observation`` is the message the model sees next ("Observation: ..."); ``reward`` is the best
    score of the episode so far, in [0, 1]; ``won`` says the task was completed; ``done`` is won, lost
    or out of steps; ``action`` is the parsed action, None when the reply had none.
    """

    observation: str
    reward: float
    done: bool
    won: bool
    action: str | None
    steps: int


@dataclass(frozen=True)
class Plan:
    """One expert solution of a task, before it is replayed.

    ``source`` names where it came from ("gt_traj", "handcoded", "planner" for ALFWorld; "gold_short",
    "gold" for ScienceWorld); a kept trajectory records it as ``extra["expert_source"]``. ``error`` says
    why the source has no plan (then ``actions`` is empty). What the replay does about a step that names
    something the agent has not seen yet (``fasteto.rollout.seen``): with ``look`` set, it first plays
    that action (one that shows the agent its surroundings, such as "look around"), unless the step
    before was that look already; with ``require_seen``, it rejects the plan if the step still names
    something unseen.
    """

    source: str
    actions: tuple[str, ...] = ()
    error: str | None = None
    look: str | None = None
    require_seen: bool = False


@dataclass(frozen=True)
class Prompt:
    """An environment's instruction message and one-shot in-context example, from prompts/<env>.json."""

    instruction: str
    icl: tuple[Message, ...]

    def context(self, task_message: str) -> list[Message]:
        """What the model reads before its first reply: instruction exchange, example, the task."""
        return [message(HUMAN, self.instruction), message(GPT, ACK), *self.icl, message(HUMAN, task_message)]


def load_prompt(env_name: str) -> Prompt:
    data = json.loads(resources.files("fasteto.envs").joinpath(f"prompts/{env_name}.json").read_text())
    icl = tuple(example_message(role, text) for role, text in data["icl"])
    return Prompt(instruction="\n".join(data["instruction"]), icl=icl)


def parse_action(reply: str) -> str | None:
    """The action of a reply: the rest of the line after its first ``Action:``; None if absent or empty."""
    match = _ACTION.search(reply)
    if match is None:
        return None
    action = match.group(1).strip()
    return action or None


class TextEnv:
    """ETO's episode protocol over an engine. Engines subclass it and implement the four hooks:

    ``_start()`` (launch the engine process, if any), ``_load(task_id) -> task message``,
    ``_act(action) -> (observation, score in [0, 1], won, lost)``, and ``max_steps(task_id)``.
    An engine raises ``EngineCrashed`` from ``_load``/``_act`` when its process has died.
    """

    name = "base"
    # Whether instances may be reset and stepped from different threads at once. True where each
    # instance drives its own engine process, so a step is a wait that threads can overlap.
    parallel_safe = False

    def __init__(self, max_restarts: int = 3):
        self.max_restarts = max_restarts
        self.restarts = 0  # over the env's lifetime: how often a dead engine was restarted
        self.prompt = load_prompt(self.name)
        self._task_id: str | None = None
        self._actions: list[str] = []
        self._messages: list[Message] = []
        self._reward = 0.0
        self._won = False
        self._done = True
        self._steps = 0
        self._limit = 0

    # The interface -----------------------------------------------------------------------------

    def reset(self, task_id: str) -> str:
        """Start an episode of ``task_id``; returns the task message the model is shown."""
        self._task_id = task_id
        self._limit = self.max_steps(task_id)
        self._actions, self._reward, self._won, self._done, self._steps = [], 0.0, False, False, 0
        task = self._with_recovery(lambda: self._load(task_id))
        self._messages = [message(HUMAN, self.prompt.instruction), message(GPT, ACK), message(HUMAN, task)]
        return task

    def step(self, reply: str) -> Step:
        """Apply one raw model reply. A reply without an action costs a step."""
        if self._done:
            raise RuntimeError(f"{self.name}: step() after the episode ended; call reset() first")
        self._steps += 1
        action = parse_action(reply)
        if action is None:
            observation = INVALID_FORMAT
        else:
            text, score, won, lost = self._with_recovery(lambda: self._act(action))
            self._actions.append(action)
            self._reward = max(self._reward, min(max(score, 0.0), 1.0))
            self._won = self._won or won
            self._done = won or lost
            observation = f"Observation: {text}"
        self._done = self._done or self._steps >= self._limit
        self._messages += [message(GPT, reply), message(HUMAN, observation)]
        return Step(observation, self._reward, self._done, self._won, action, self._steps)

    def trajectory(self, extra: dict | None = None) -> Trajectory:
        """The episode so far in ETO's stored layout; the trailing observation is dropped."""
        messages = self._messages
        if self._steps and messages[-1]["from"] == HUMAN:
            messages = messages[:-1]
        return Trajectory(id=self._task_id, conversations=list(messages), reward=self._reward,
                          extra=dict(extra or {}))

    @property
    def won(self) -> bool:
        return self._won

    def close(self) -> None:
        """Release the engine (its process, if any)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # Recovery ----------------------------------------------------------------------------------

    def _with_recovery(self, fn):
        for attempt in range(self.max_restarts + 1):
            try:
                return fn()
            except EngineCrashed as crash:
                if attempt == self.max_restarts:
                    raise EnvCrashedError(
                        f"{self.name}: the engine died {attempt + 1} times in one episode of task "
                        f"{self._task_id!r} (last: {crash}); giving up on this episode"
                    ) from crash
                self._restart()

    def _restart(self) -> None:
        """Start a fresh engine and bring it to where the dead one was: reload, replay the actions."""
        self.restarts += 1
        self._start()
        if self._task_id is not None:
            self._load(self._task_id)
            for action in self._actions:
                self._act(action)

    # Engine hooks ------------------------------------------------------------------------------

    def _start(self) -> None:
        raise NotImplementedError

    def _load(self, task_id: str) -> str:
        raise NotImplementedError

    def _act(self, action: str) -> tuple[str, float, bool, bool]:
        raise NotImplementedError

    def max_steps(self, task_id: str) -> int:
        raise NotImplementedError

    def task_ids(self, split: str) -> list[str]:
        raise NotImplementedError

    def expert_plans(self, task_id: str) -> Iterator[Plan]:
        """Solutions to try, in order of preference; the expert replay keeps the first that wins. A
        generator, so that a costly source is only asked when the ones before it did not win."""
        raise NotImplementedError

    def expert_actions(self, task_id: str) -> list[str]:
        """The actions of the first plan that has any (not replayed); ValueError with every source's
        reason when none has."""
        reasons = []
        for plan in self.expert_plans(task_id):
            if plan.error is None and plan.actions:
                return list(plan.actions)
            reasons.append(f"{plan.source}: {plan.error or 'no actions'}")
        raise ValueError("; ".join(reasons) or f"{self.name}: no expert plans for {task_id!r}")

    def record_extra(self, task_id: str) -> dict:
        """Keys an SFT record of this environment carries beside id and conversations."""
        return {}
