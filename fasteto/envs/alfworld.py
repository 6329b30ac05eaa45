"""ALFWorld (Shridhar et al. 2021): TextWorld's engine over ALFRED's PDDL games, in this process.

Games come from ``$ALFWORLD_DATA/json_2.1.1/<split>/<task-dir>/<trial>/game.tw-pddl``; each game file
embeds its PDDL domain and grammar. Task ids are ``"<task-dir>/<trial>"`` (ETO's game ids).
ETO's protocol: the task message is the game's opening text without its banner, "You arrive at loc N."
is cut from observations, reward 1 when won, 40 steps.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import random
import re
from collections.abc import Iterator
from functools import cache, partial
from pathlib import Path

from fasteto.envs.base import EnvSetupError, Plan, TextEnv

MAX_STEPS = 40
EXPERTS = ("auto", "gt_traj", "handcoded", "planner")
GT_TRAJ = "gt_traj.json"  # beside each train game: a searching expert trajectory that ships with ALFWorld
EXPERT_TIMEOUT = 60.0  # seconds for one expert attempt
EXPERT_TIMEOUT_STEPS = 150  # ALFWorld's own budget for its hand-coded expert
SPLITS = {"train": "train", "valid_seen": "valid_seen", "seen": "valid_seen", "dev": "valid_seen",
          "valid_unseen": "valid_unseen", "unseen": "valid_unseen", "test": "valid_unseen"}
_ARRIVE = re.compile(r"^You arrive at loc \d+\. ")

DATA_HELP = (
    "ALFWorld's game files were not found: {why}. fasteto looks in --alfworld-data, then $ALFWORLD_DATA, "
    "then ~/.cache/alfworld (where `alfworld-download` puts them). Get them with "
    "`pip install alfworld && alfworld-download` (needs internet), or set ALFWORLD_DATA to a folder laid "
    "out as json_2.1.1/{{train,valid_seen,valid_unseen}}/<task-dir>/<trial>/game.tw-pddl."
)


def find_data(explicit: str | os.PathLike | None = None) -> Path:
    """The ALFWorld data folder: ``explicit``, else $ALFWORLD_DATA, else ~/.cache/alfworld."""
    candidates = [explicit] if explicit else []
    candidates += [os.environ.get("ALFWORLD_DATA"), Path.home() / ".cache" / "alfworld"]
    tried = [Path(c).expanduser() for c in candidates if c]
    for folder in tried:
        if (folder / "json_2.1.1").is_dir():
            return folder
        if explicit:  # an explicit folder that is wrong is an error, not a reason to look elsewhere
            break
    raise EnvSetupError(DATA_HELP.format(why="no json_2.1.1/ in " + ", ".join(map(str, tried))))


@cache
def split_task_ids(data: Path, split: str) -> tuple[str, ...]:
    """Solvable games of a split, as ETO and ALFWorld select them (no movable or sliced objects)."""
    if split not in SPLITS:
        raise ValueError(f"alfworld: unknown split {split!r}; choose one of {sorted(SPLITS)}")
    root = data / "json_2.1.1" / SPLITS[split]
    if not root.is_dir():
        raise EnvSetupError(DATA_HELP.format(why=f"{root} is missing"))
    ids = []
    for game in sorted(root.glob("*/*/game.tw-pddl")):
        task_id = f"{game.parent.parent.name}/{game.parent.name}"
        if "movable" in task_id or "Sliced" in task_id or not (game.parent / "traj_data.json").exists():
            continue
        if json.loads(game.read_text()).get("solvable", False):
            ids.append(task_id)
    return tuple(ids)


def _with_timeout(fn, seconds: float):
    """``fn()`` in a forked child, killed after ``seconds``: Fast Downward runs in C and cannot be
    interrupted from Python. ValueError from ``fn`` (or the timeout) is raised here with its message."""
    ctx = multiprocessing.get_context("fork")
    receive, send = ctx.Pipe(duplex=False)

    def child() -> None:
        try:
            send.send(("ok", fn()))
        except Exception as exc:  # a child's error of any kind becomes the reason for the parent
            send.send(("error", str(exc) if isinstance(exc, ValueError) else f"{type(exc).__name__}: {exc}"))

    process = ctx.Process(target=child, daemon=True)
    process.start()
    try:
        if not receive.poll(seconds):
            raise ValueError(f"no plan within {seconds:.0f} s")
        kind, value = receive.recv()
    except EOFError:
        raise ValueError(f"the expert process died (exit code {process.exitcode})") from None
    finally:
        process.kill()
        process.join()
    if kind == "error":
        raise ValueError(value)
    return value


def read_gt_traj(path: Path) -> list[str]:
    """The actions of a ``gt_traj.json``: a JSON list of ``{"from": "human"|"gpt", "value": str}``
    alternating from the game's opening text (human), each gpt message one action. ValueError naming the
    file when it is missing or not of that shape."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"{path} is missing (ALFWorld ships {GT_TRAJ} for train games only)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, list) or not data:
        raise ValueError(f"{path}: expected a non-empty JSON list of {{\"from\", \"value\"}} messages")
    for i, item in enumerate(data):
        role = "human" if i % 2 == 0 else "gpt"
        if not (isinstance(item, dict) and item.get("from") == role and isinstance(item.get("value"), str)):
            raise ValueError(f"{path}: message {i} is {json.dumps(item)[:80]}; expected "
                             f"{{\"from\": \"{role}\", \"value\": <text>}} (human and gpt alternate, "
                             "starting with the game's opening text)")
    actions = [item["value"].strip() for item in data[1::2]]
    if not actions or not all(actions):
        raise ValueError(f"{path}: {'an empty action' if actions else 'no actions'}; expected gpt "
                         "messages that each hold one action")
    return actions


def clean_observation(text: str) -> str:
    return _ARRIVE.sub("", text.strip())


class AlfWorldEnv(TextEnv):
    """ALFWorld games through TextWorld, in-process. One env plays one game at a time."""

    name = "alfworld"
    parallel_safe = False  # TextWorld runs in this process, and its PDDL parser is not thread-safe

    def __init__(self, data: str | os.PathLike | None = None, expert: str = "auto",
                 expert_timeout: float = EXPERT_TIMEOUT, max_restarts: int = 3):
        super().__init__(max_restarts=max_restarts)
        self.expert_timeout = expert_timeout
        if expert not in EXPERTS:
            raise ValueError(f"alfworld: unknown expert {expert!r}; choose one of {', '.join(EXPERTS)}")
        self.expert = expert
        self.data = find_data(data)
        self._game = None
        self._start()

    def task_ids(self, split: str) -> list[str]:
        return list(split_task_ids(self.data, split))

    def max_steps(self, task_id: str) -> int:
        return MAX_STEPS

    def record_extra(self, task_id: str) -> dict:
        """ETO's ALFWorld records carry their game file; here relative to the data folder."""
        return {"game_file": str(self.game_file(task_id).relative_to(self.data))}

    def game_file(self, task_id: str) -> Path:
        """The game file of a task id, searched in every split."""
        for split in ("train", "valid_seen", "valid_unseen"):
            path = self.data / "json_2.1.1" / split / task_id / "game.tw-pddl"
            if path.exists():
                return path
        raise ValueError(f"alfworld: unknown task id {task_id!r}: no {task_id}/game.tw-pddl under "
                         f"{self.data / 'json_2.1.1'}/{{train,valid_seen,valid_unseen}}")

    def expert_plans(self, task_id: str) -> Iterator[Plan]:
        """ALFWorld's experts for ``task_id``, of the kind given at construction, in order of preference.

        "gt_traj": the actions of the game's ``gt_traj.json`` (train games only), a trajectory that
        searches the receptacles one by one until the object turns up.
        "handcoded": ALFWorld's hand-coded expert (``AlfredExpert``), which searches too, choosing from
        the observations (and the engine's facts about what it holds); it often gets lost, so each of 5
        attempts seeds its random choices from the task id and the first within the step limit is used.
        "planner": the PDDL planner's plan, deterministic and shortest; it knows where every object is,
        so it never searches. Fast Downward takes under 10 s on most games but minutes on some. Only
        when asked for: an agent cannot learn to walk straight to a hidden object.
        "auto" (default): gt_traj, then handcoded (asked only when gt_traj's replay does not win).
        The searching experts must act on what the agent has seen: a replay whose step names an object
        no observation showed yet (a few gt_traj files take from a receptacle the agent is not at) is
        rejected, as ``Plan.require_seen`` says.
        """
        if self.expert in ("gt_traj", "auto"):
            try:
                actions = read_gt_traj(self.game_file(task_id).parent / GT_TRAJ)
                yield Plan("gt_traj", tuple(actions), require_seen=True)
            except ValueError as exc:
                yield Plan("gt_traj", error=str(exc))
        if self.expert in ("handcoded", "auto"):
            yield self._handcoded_plan(task_id)
        if self.expert == "planner":
            try:
                plan = partial(self._expert_attempt, task_id, "planner", None)
                yield Plan("planner", tuple(_with_timeout(plan, self.expert_timeout)))
            except ValueError as exc:
                yield Plan("planner", error=str(exc))

    def _handcoded_plan(self, task_id: str) -> Plan:
        reasons: list[str] = []
        for attempt in range(5):
            try:
                search = partial(self._expert_attempt, task_id, "handcoded", f"{task_id}#{attempt}")
                actions = _with_timeout(search, self.expert_timeout)
            except ValueError as exc:
                reasons.append(str(exc))
                continue
            if len(actions) <= MAX_STEPS:
                return Plan("handcoded", tuple(actions), require_seen=True)
            reasons.append(f"plan of {len(actions)} steps is over the {MAX_STEPS}-step limit")
        return Plan("handcoded", error=", ".join(dict.fromkeys(reasons)))

    def _expert_attempt(self, task_id: str, kind: str, seed: str | None) -> list[str]:
        import textworld
        from alfworld.agents.environment.alfred_tw_env import AlfredExpert

        saved = random.getstate()
        random.seed(seed)  # the hand-coded expert draws from the global generator
        env = self._open(self.game_file(task_id), textworld, expert=AlfredExpert(expert_type=kind))
        try:
            state, actions = env.reset(), []
            if kind == "planner":
                # The whole plan at once; the replay through this env checks that it wins. Stepping the
                # expert env instead would replan after every action, at up to seconds each.
                actions = list(state["extra.expert_plan"] or [])
                if not actions:
                    raise ValueError("the planner found no plan")
            while kind == "handcoded" and not state["won"] and len(actions) < EXPERT_TIMEOUT_STEPS:
                actions.append(state["extra.expert_plan"][0])
                state, _, _ = env.step(actions[-1])
        except ValueError:
            raise
        except Exception as exc:  # the hand-coded expert raises a bare Exception("Timeout") when lost
            raise ValueError(f"expert gave up ({exc or type(exc).__name__})") from exc
        finally:
            env.close()
            random.setstate(saved)
        if kind == "handcoded" and not state["won"]:
            raise ValueError(f"expert did not win within {EXPERT_TIMEOUT_STEPS} steps")
        while actions and actions[0] == "look":
            actions.pop(0)
        return actions

    def close(self) -> None:
        if self._game is not None:
            self._game.close()
            self._game = None

    # Engine hooks --------------------------------------------------------------------------------

    def _start(self) -> None:
        try:
            import textworld  # noqa: F401
            from alfworld.agents.environment import alfred_tw_env  # noqa: F401
        except ImportError as exc:
            raise EnvSetupError(
                "alfworld: the `alfworld` package is not installed; `pip install 'fasteto[envs]'`"
            ) from exc
        from fasteto.envs import textworld_speedups

        textworld_speedups.install()  # the same observations, less work per step and per game start

    def _load(self, task_id: str) -> str:
        import textworld

        self.close()
        self._game = self._open(self.game_file(task_id), textworld)
        opening = self._game.reset().feedback
        # The opening is "-= Welcome to TextWorld, ALFRED! =-\n\n<room>\n\n<task>": drop the banner.
        return "\n".join(opening.split("\n\n")[1:]).strip()

    def _act(self, action: str) -> tuple[str, float, bool, bool]:
        state, _, _ = self._game.step(action)
        won = bool(state["won"])
        return clean_observation(state.feedback), float(won), won, bool(state["lost"])

    @staticmethod
    def _open(game_file: Path, textworld, expert=None):
        from alfworld.agents.environment.alfred_tw_env import AlfredDemangler, AlfredInfos

        wrappers = [AlfredDemangler(shuffle=False), AlfredInfos]
        infos = textworld.EnvInfos(won=True, lost=True, extras=["gamefile"])
        if expert is not None:  # the expert reads these and writes its plan into extra.expert_plan
            wrappers.append(expert)
            infos = textworld.EnvInfos(won=True, lost=True, admissible_commands=True,
                                       extras=["gamefile", "expert_plan"])
        return textworld.start(str(game_file), request_infos=infos, wrappers=wrappers)
