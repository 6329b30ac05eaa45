"""ScienceWorld (Wang et al. 2022) through its Python package and its Scala simulator (a JVM).

Task ids follow ETO: ``"<eto task number>_<variation>"``, e.g. ``"9_412"`` is variation 412 of
``task-2a-test-conductivity``. All 30 task types load; ETO's split lists cover 24 of them.
ETO's protocol: the "easy" simplifications (teleport, doors open, ...), the task description as the task
message, reward = best score / 100, and ETO's per-task step limits (100 where ETO gives none).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from functools import cache
from importlib import resources

from fasteto.envs.base import EngineCrashed, EnvSetupError, Plan, TextEnv

SIMPLIFICATIONS = "easy"
LOOK = "look around"  # shows the room: what the replay plays before a gold step that names the unseen
DEFAULT_MAX_STEPS = 100  # ScienceWorld's own default step limit, for the task types ETO did not use

# ETO numbers task types by the alphabetical order of its task names; it left out number 5.
_MISSING_FROM_ETO = {"task-10-measure-melting-point-(unknown-substance)": 5}
SPLITS = {"train": "train", "dev": "dev", "seen": "dev", "test": "test", "unseen": "test"}

JAVA_HELP = (
    "ScienceWorld needs Java 17 or newer, and no `java` was found on PATH. Install it, e.g. "
    "`apt-get install openjdk-17-jre-headless` (Debian/Ubuntu) or `brew install openjdk@17` (macOS), "
    "then check with `java -version`."
)


def _split_file(name: str) -> str:
    return resources.files("fasteto.envs").joinpath(f"splits/sciworld/{name}").read_text()


@cache
def task_table() -> dict[int, str]:
    """ETO task number -> ETO task name (``task-1-boil``), all 30 task types."""
    names = {**json.loads(_split_file("taskname2id.json")), **_MISSING_FROM_ETO}
    return {number: name for name, number in names.items()}


@cache
def _max_steps_table() -> dict[str, int]:
    return json.loads(_split_file("max_steps.json"))


def parse_task_id(task_id: str) -> tuple[str, int]:
    """``"9_412"`` -> (``"task-2a-test-conductivity"``, 412); a clear error for anything else."""
    number, sep, variation = str(task_id).partition("_")
    if not (sep and number.isdigit() and variation.isdigit() and int(number) in task_table()):
        raise ValueError(
            f"sciworld: unknown task id {task_id!r}; expected '<task number>_<variation>' with a task "
            f"number in 0..29, e.g. '0_21' (variation 21 of task-1-boil)"
        )
    return task_table()[int(number)], int(variation)


def task_id_of(eto_name: str, variation: int) -> str:
    numbers = {name: number for number, name in task_table().items()}
    return f"{numbers[eto_name]}_{variation}"


def split_task_ids(split: str) -> list[str]:
    """ETO's task list of a split: train (1,483), dev = seen (194), test = unseen (211)."""
    if split not in SPLITS:
        raise ValueError(f"sciworld: unknown split {split!r}; choose one of {sorted(SPLITS)}")
    pairs = json.loads(_split_file(f"{SPLITS[split]}_indices.json"))
    return [task_id_of(name, variation) for name, variation in pairs]


def shorten_gold_path(actions: list[str]) -> list[str]:
    """The gold path as an agent in the "easy" setting would walk it.

    Gold paths walk room to room and open each door on the way, which ETO's step limits often cannot
    afford. With every door open and teleport allowed, "open door to X" does nothing and a run of moves
    ("go to hallway", "go to greenhouse") is one "teleport to greenhouse". ::

        ["open door to hallway", "go to hallway", "open door to greenhouse", "go to greenhouse",
         "look around"]
        -> ["teleport to greenhouse", "look around"]
    """
    out: list[str] = []
    moving = False  # the last kept action is a teleport that a following move may replace
    for action in actions:
        if action.startswith("open door to "):
            continue
        if action.startswith("go to ") or action.startswith("teleport to "):
            target = action.split(" to ", 1)[1]
            if moving:
                out.pop()
            out.append(f"teleport to {target}")
            moving = True
            continue
        out.append(action)
        moving = False
    return out


class SciWorldEnv(TextEnv):
    """One ScienceWorld simulator (one JVM). Not thread-safe; use one per worker process."""

    name = "sciworld"
    parallel_safe = True  # one JVM per instance

    def __init__(self, max_restarts: int = 3):
        super().__init__(max_restarts=max_restarts)
        self._sw = None
        self._start()

    def task_ids(self, split: str) -> list[str]:
        return split_task_ids(split)

    def max_steps(self, task_id: str) -> int:
        return _max_steps_table().get(parse_task_id(task_id)[0], DEFAULT_MAX_STEPS)

    def expert_plans(self, task_id: str) -> Iterator[Plan]:
        """ScienceWorld's gold action sequence for the task (``generateGoldPath``) shortened for the
        "easy" setting by ``shorten_gold_path`` ("gold_short"), then the gold path as generated ("gold"):
        on a few tasks (about 1%) skipping the walk changes the outcome (time passes while walking), and
        only the full path wins. Gold paths act on things they have not looked at (a teleport, then
        "focus on" an animal never seen); the replay plays "look around" before such a step."""
        gold = tuple(self._with_recovery(lambda: self._gold(task_id)))
        short = tuple(shorten_gold_path(list(gold)))
        if short != gold:
            yield Plan("gold_short", short, look=LOOK)
        yield Plan("gold", gold, look=LOOK)

    def close(self) -> None:
        if self._sw is not None:
            try:
                self._sw.close()
            except Exception:  # a dead JVM has nothing left to close
                pass
            self._sw = None

    def jvm_process(self):
        """The simulator's JVM (a ``subprocess.Popen``; tests kill it to check recovery)."""
        return self._sw._gateway.java_process

    # Engine hooks --------------------------------------------------------------------------------

    def _start(self) -> None:
        if shutil.which("java") is None:
            raise EnvSetupError(JAVA_HELP)
        try:
            from scienceworld import ScienceWorldEnv as _Simulator
        except ImportError as exc:
            raise EnvSetupError(
                "sciworld: the `scienceworld` package is not installed; `pip install 'fasteto[envs]'`"
            ) from exc
        self.close()
        self._sw = _Simulator("", envStepLimit=10**9)  # fasteto counts steps itself

    def _load(self, task_id: str) -> str:
        name, variation = parse_task_id(task_id)
        self._call(lambda: self._sw.load(name, variation, SIMPLIFICATIONS, generateGoldPath=False))
        return self._reset_and_describe()

    def _gold(self, task_id: str) -> list[str]:
        name, variation = parse_task_id(task_id)
        self._call(lambda: self._sw.load(name, variation, SIMPLIFICATIONS, generateGoldPath=True))
        return list(self._call(lambda: self._sw.server.getGoldActionSequence()))

    def _reset_and_describe(self) -> str:
        # ScienceWorldEnv.reset() also steps "look around"; ETO ignores that observation, so we only reset.
        self._call(lambda: self._sw.server.reset())
        description = self._call(lambda: self._sw.server.freeActionTaskDesc())
        return description.removeprefix("Task Description:").strip()

    def _act(self, action: str) -> tuple[str, float, bool, bool]:
        # The simulator's server directly: ScienceWorldEnv.step() also lists every valid action at each
        # step, a second round of work in the JVM that fasteto does not use.
        server = self._sw.server
        observation = self._call(lambda: server.step(action))
        score = self._call(lambda: server.getScore())
        completed = self._call(lambda: server.getCompleted())
        won = score >= 1.0
        lost = score < 0 or (completed and not won)
        return observation.strip(), float(score), won, lost

    def _call(self, fn):
        """Run one simulator call; a dead JVM becomes EngineCrashed, other Java errors pass through."""
        from py4j.protocol import Py4JError, Py4JJavaError

        try:
            return fn()
        except Py4JJavaError:
            raise
        except Py4JError as exc:
            raise EngineCrashed(f"ScienceWorld's JVM stopped answering: {type(exc).__name__}") from exc
