"""Expert trajectories made offline from the environments' own solutions.

ETO's expert set was written by GPT-4. Here each task's plans come from its environment (ScienceWorld's
gold path; ALFWorld's searching ``gt_traj.json`` or its hand-coded expert) and are replayed through the
same ``TextEnv`` interface the agent uses, with a thought before each action made from what the agent
has seen so far (``thoughts``), so a stored expert trajectory carries the real observations in exactly
the agent's format. Only replays that reach reward 1.0 are kept; each records the plan's source as
``extra["expert_source"]``.

Each finished task is cached as one small JSON file, keyed by environment, split, task and a digest of
everything that shapes the trajectory (prompt, thoughts, format). A rerun, or the training loop's first
use, reads the cache and solves only what is missing; a kill loses nothing finished.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import re
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field, replace
from importlib import resources
from multiprocessing import get_context
from pathlib import Path

from fasteto.data.formats import trajectory_from_record
from fasteto.data.types import Trajectory
from fasteto.envs import EnvCrashedError, Plan, TextEnv, env_class, make_env
from fasteto.envs.base import load_prompt
from fasteto.rollout.seen import History, unseen_mentions
from fasteto.rollout.thoughts import expert_reply
from fasteto.utils.io import atomic_write_json

FORMAT_VERSION = "3"  # 3: thoughts from the history, ALFWorld's gt_traj first, expert_source recorded
SOURCE_KEY = "expert_source"
# Modules whose source shapes a stored trajectory's replies, hashed into the cache version.
_SHAPING_SOURCES = ("rollout/thoughts.py", "rollout/thoughts_alfworld.py",
                    "rollout/thoughts_sciworld.py", "rollout/seen.py")
_NOT_SHAPING = ("data", "max_restarts")  # env options that do not change a solved trajectory
POOL_ATTEMPTS = 3  # pools started per run when worker processes die


def default_cache_dir() -> Path:
    """``$FASTETO_CACHE``, else ``$XDG_CACHE_HOME/fasteto``, else ``~/.cache/fasteto``."""
    if os.environ.get("FASTETO_CACHE"):
        return Path(os.environ["FASTETO_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "fasteto"


def cache_version(env_name: str, env_kwargs: dict | None = None) -> str:
    """A digest of the inputs that shape a stored expert trajectory (format, instruction message, the
    thought and unseen-check code, the choice of expert); a change makes a new cache. Neither the
    in-context example (not stored in trajectories) nor the data folder is part of it. Options left out
    take the constructor's defaults, so ``{}`` and ``{"expert": "auto"}`` share one cache."""
    params = inspect.signature(env_class(env_name)).parameters
    options = {k: p.default for k, p in params.items() if p.default is not inspect.Parameter.empty}
    options.update(env_kwargs or {})
    options = sorted((k, str(v)) for k, v in options.items() if k not in _NOT_SHAPING)
    code = [resources.files("fasteto").joinpath(name).read_text() for name in _SHAPING_SOURCES]
    parts = [FORMAT_VERSION, str(options), load_prompt(env_name).instruction, *code]
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:12]


def solve(env: TextEnv, task_id: str) -> tuple[Trajectory | None, str | None]:
    """Replay the env's plans for ``task_id`` through ``env``, in the env's order of preference.

    Returns (trajectory, None) for the first plan whose replay reaches reward 1.0, its source recorded
    as ``extra["expert_source"]`` ("<source>+looks" when the replay added looks); else (None, reason)
    with every replay's reason, "<source>: <why>" joined by "; ". A plan whose replay with added looks
    does not win is replayed once more as it is.
    """
    reasons = []
    try:
        for plan in env.expert_plans(task_id):
            if plan.error is not None:
                reasons.append(f"{plan.source}: no plan: {plan.error}")
                continue
            for attempt in (plan, replace(plan, look=None)):
                reason, looks = _replay(env, task_id, attempt)
                source = attempt.source + ("+looks" if looks else "")
                if reason is None:  # the env holds the winning episode
                    extra = {**env.record_extra(task_id), SOURCE_KEY: source}
                    return env.trajectory(extra=extra), None
                reasons.append(f"{source}: {reason}")
                if not looks:
                    break
    except ValueError as exc:  # no plan can be made at all (an unknown task id, say)
        reasons.append(f"no plan: {exc}")
    return None, "; ".join(reasons) or "no plan: the environment offered none"


def _replay(env: TextEnv, task_id: str, plan: Plan) -> tuple[str | None, int]:
    """Play ``plan``; returns (None when it wins, else why not; how many looks it added). Each reply's
    thought sees only the history so far."""
    if not plan.actions:
        return "no plan: the solver returned no actions", 0
    history, looks = History(env.reset(task_id)), 0
    check = plan.look is not None or plan.require_seen
    for action in plan.actions:
        unseen = unseen_mentions(history, action) if check else []
        if unseen and plan.look and action != plan.look and history.actions[-1:] != (plan.look,):
            step = env.step(expert_reply(env.name, history, plan.look))
            history, looks = history.then(plan.look, step.observation), looks + 1
            if step.done:
                break
            unseen = unseen_mentions(history, action)
        if unseen and plan.require_seen:
            return (f"a step names something not yet seen (step {len(history.actions) + 1}, {action!r}: "
                    f"{', '.join(unseen)})"), looks
        step = env.step(expert_reply(env.name, history, action))
        history = history.then(action, step.observation)
        if step.done:
            break
    if step.reward >= 1.0:
        return None, looks
    limit = env.max_steps(task_id)
    if step.steps >= limit and len(plan.actions) > limit:
        return f"plan longer than the step limit ({len(plan.actions)} > {limit})", looks
    if step.steps >= limit:
        return f"plan with the added looks longer than the step limit ({len(plan.actions)} + {looks})", looks
    return f"replay ended below reward 1 ({step.reward:.2f})", looks


@dataclass
class ExpertReport:
    """What a run of ``make_experts`` produced, in split order."""

    trajectories: list[Trajectory]
    dropped: dict[str, str] = field(default_factory=dict)  # task id -> reason
    from_cache: int = 0
    seconds: float = 0.0
    restarts: int = 0

    def drop_reasons(self) -> Counter:
        """Reasons with their counts. Each plan's part ("<source>: <why>") keeps its source and the head
        of its why (cut at the next ':' and at ' ('), so that like counts with like."""
        return Counter(_reason_kind(reason) for reason in self.dropped.values())

    def sources(self) -> Counter:
        """Kept trajectories per expert source (``extra["expert_source"]``)."""
        return Counter(t.extra.get(SOURCE_KEY, "unknown") for t in self.trajectories)

    def summary(self) -> str:
        total = len(self.trajectories) + len(self.dropped)
        lines = [f"{len(self.trajectories)} of {total} tasks kept ({self.from_cache} from cache), "
                 f"{len(self.dropped)} dropped, {self.seconds:.0f} s, {self.restarts} engine restarts"]
        lines += [f"  kept: {count} x {source}" for source, count in self.sources().most_common()]
        lines += [f"  dropped: {count} x {reason}" for reason, count in self.drop_reasons().most_common()]
        return "\n".join(lines)


def _reason_kind(reason: str) -> str:
    parts = []
    for part in reason.split("; "):
        source = re.match(r"([\w+]+): ", part)
        rest = part[source.end():] if source else part
        head = rest.split(":")[0].split(" (")[0]
        parts.append(f"{source[1]}: {head}" if source else head)
    return "; ".join(parts)


def make_experts(env_name: str, split: str, limit: int | None = None, workers: int | None = None,
                 cache_dir: str | os.PathLike | None = None, env_kwargs: dict | None = None,
                 progress: bool = True, task_ids: list[str] | None = None) -> ExpertReport:
    """Expert trajectories for the tasks of a split (or the given ``task_ids`` of it), solved in
    parallel and cached per task."""
    start = time.time()
    env_kwargs = dict(env_kwargs or {})
    if task_ids is None:
        task_ids = _task_ids(env_name, split, env_kwargs)[:limit]
    version = cache_version(env_name, env_kwargs)
    folder = Path(cache_dir or default_cache_dir()) / "expert" / version / env_name / split
    records = {tid: rec for tid in task_ids if (rec := _read_cached(folder, tid)) is not None}
    from_cache = len(records)
    restarts = 0
    for pool_attempt in range(POOL_ATTEMPTS):
        todo = [tid for tid in task_ids if tid not in records]
        if not todo:
            break
        try:
            restarts += _solve_all(env_name, env_kwargs, todo, folder, records, workers, progress)
        except BrokenProcessPool:  # a worker was killed (out of memory, say): finished tasks are kept
            if pool_attempt == POOL_ATTEMPTS - 1:
                raise
            print(f"expert {env_name}: a worker process died; starting new workers for the rest")
    report = ExpertReport(trajectories=[], from_cache=from_cache, restarts=restarts)
    for tid in task_ids:
        record = records.get(tid)
        if record is None:
            report.dropped[tid] = "engine crashed repeatedly (not cached, a rerun retries it)"
        elif record["trajectory"] is None:
            report.dropped[tid] = record["dropped"]
        else:
            report.trajectories.append(trajectory_from_record(record["trajectory"], "sft", str(folder)))
    report.seconds = time.time() - start
    return report


def _task_ids(env_name: str, split: str, env_kwargs: dict) -> list[str]:
    if env_name == "sciworld":  # known without starting a JVM
        from fasteto.envs.sciworld import split_task_ids

        return split_task_ids(split)
    env = make_env(env_name, **env_kwargs)
    try:
        return env.task_ids(split)
    finally:
        env.close()


def _cache_file(folder: Path, task_id: str) -> Path:
    return folder / (task_id.replace("/", "__") + ".json")


def _read_cached(folder: Path, task_id: str) -> dict | None:
    path = _cache_file(folder, task_id)
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def _solve_all(env_name, env_kwargs, todo, folder, records, workers, progress) -> int:
    from tqdm import tqdm

    workers = max(1, min(workers or os.cpu_count() or 1, len(todo)))
    # spawn: each worker owns its engine (a JVM for ScienceWorld), which must not be forked.
    with ProcessPoolExecutor(workers, mp_context=get_context("spawn"), initializer=_init_worker,
                             initargs=(env_name, env_kwargs)) as pool:
        results = pool.map(_solve_task, [(tid, str(folder)) for tid in todo], chunksize=1)
        bar = tqdm(results, total=len(todo), desc=f"expert {env_name}", unit="task", disable=not progress)
        restarts = 0
        for tid, record, worker_restarts in bar:
            restarts += worker_restarts
            if record is not None:
                records[tid] = record
    return restarts


_WORKER_ENV: TextEnv | None = None  # one engine per worker process, started by _init_worker


def _init_worker(env_name: str, env_kwargs: dict) -> None:
    global _WORKER_ENV
    _WORKER_ENV = make_env(env_name, **env_kwargs)


def _solve_task(args: tuple[str, str]) -> tuple[str, dict | None, int]:
    """Solve one task in a worker and cache the result; returns (task id, record or None, restarts)."""
    task_id, folder = args
    env = _WORKER_ENV
    before = env.restarts
    started = time.time()
    try:
        trajectory, reason = solve(env, task_id)
    except EnvCrashedError:
        return task_id, None, env.restarts - before
    record = {"task_id": task_id, "seconds": round(time.time() - started, 3),
              "trajectory": trajectory.to_record(with_reward=True) if trajectory else None,
              "dropped": reason}
    atomic_write_json(_cache_file(Path(folder), task_id), record, indent=None)
    return task_id, record, env.restarts - before
