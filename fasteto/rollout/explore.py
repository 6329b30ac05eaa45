"""The explorer: the current policy plays every task once, and each finished episode is stored at once.

Up to ``concurrency`` episodes are in flight, each in its own environment. With an engine that can take
rows one at a time (``ContinuousEngine``: ``submit``/``step``/``release``) there are no rounds: a finished
reply goes to its environment while the other rows keep decoding, and the next prompt joins the running
batch when the observation is back. With any other engine, every round the engine writes
the next reply of all live episodes in one batched call, then every environment applies its reply (in
threads: a ScienceWorld step waits on its own JVM; ALFWorld, which cannot step in threads, runs each
environment in its own process through ``ProcessEnv``). A finished episode is appended to a JSON Lines
store straight away and its slot takes the next task, so the batch stays full until the tasks run out.
With ``samples=K`` every task is played K times (sampled decoding: self-play, best-of-N); the K episodes
of a task are in flight together, and each record carries its ``sample`` number.

The engine reads what ETO's agent read: instruction exchange, the one-shot example, the task, then the
episode so far. The store keeps ETO's layout (the example is not stored; see ``fasteto.data.types``)
plus the reward: an explored record. A rerun reads the store and plays only the tasks not in it, so a
kill (even ``kill -9``) loses no finished episode. An environment that keeps crashing is retried twice
from scratch, then recorded with reward null, which the pair builder skips. An engine call that raises is
that raises a retryable error (``TransientEngineError``, a connection error, a timeout) is made again up
to twice, each retry counted; any other engine error ends the call at once. Finished episodes are stored
either way.
"""

from __future__ import annotations

import itertools
import time
import zlib
from collections import deque
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from contextlib import suppress
from dataclasses import dataclass, field, replace
from pathlib import Path

from fasteto.data.formats import append_jsonl, read_jsonl_tolerant, trajectory_from_record
from fasteto.data.types import GPT, HUMAN, Message, Trajectory, message
from fasteto.envs.base import ACK, EnvCrashedError, Step, TextEnv
from fasteto.rollout.engine import RETRYABLE_ERRORS, GenerationConfig, PolicyEngine

MAX_RETRIES = 2  # an episode whose environment crashes is played again from scratch this many times
ENGINE_RETRIES = 2  # a failed engine call (e.g. a dropped connection to a server) is retried this often


@dataclass
class ExploreReport:
    """What a call of ``explore`` left in its store, for the task ids it was given."""

    trajectories: list[Trajectory]  # every stored trajectory of these task ids, in task order
    new_episodes: int = 0  # recorded by this call (crashed ones with reward null included)
    resumed: int = 0  # found in the store at the start, not played again
    crashes: int = 0  # episodes lost to an EnvCrashedError (each retried or recorded as null)
    engine_retries: int = 0  # engine calls that raised and were made again
    env_steps: int = 0
    seconds: float = 0.0
    env_seconds: float = 0.0  # time inside this job's env resets and steps, summed over threads
    reply_ids: dict = field(default_factory=dict)  # (task, sample) -> generated token ids of each turn

    def summary(self) -> str:
        rate = self.env_steps / self.seconds if self.seconds else 0.0
        return (f"{len(self.trajectories)} trajectories ({self.new_episodes} new, {self.resumed} resumed), "
                f"{self.crashes} env crashes, {self.engine_retries} engine retries, {self.env_steps} env "
                f"steps in {self.seconds:.0f} s ({rate:.1f} steps/s)")


@dataclass(frozen=True)
class EvalResult:
    """ETO's metrics: average reward x 100, and the fraction of tasks with reward 1.0, over ``n`` tasks.

    ``rewards`` maps each task id to the reward it was scored with (a crash as 0.0), in task order: what
    confidence intervals and paired comparisons need. Equality compares the metrics only.
    """

    average_reward_x100: float
    success_rate: float
    n: int
    rewards: dict[str, float] = field(default_factory=dict, compare=False)


@dataclass
class ExploreJob:
    """One environment's share of an ``explore_many`` call: how to open its environments, its tasks,
    its store, and how many times to play each task."""

    make_env: Callable[[], TextEnv]
    task_ids: list[str]
    store: Path
    samples: int = 1
    max_steps: int | None = None  # end each episode after this many steps (None: the environment's limit)


@dataclass
class _Episode:
    """One task in flight in one slot: what the engine reads, and the attempt number."""

    job: int
    task_id: str
    sample: int | None = None  # which of a task's K samples (None when each task is played once)
    attempt: int = 0
    context: list[Message] = field(default_factory=list)  # instruction, OK, example, task
    turns: list[Message] = field(default_factory=list)  # replies and observations so far
    reply_ids: list[list[int]] = field(default_factory=list)  # token ids of each reply, when known

    def conversation(self) -> list[Message]:
        return self.context + self.turns


def explore(make_env: Callable[[], TextEnv], engine: PolicyEngine, task_ids: list[str], store: Path,
            gen: GenerationConfig, concurrency: int = 4, progress: bool = True,
            samples: int = 1, max_steps: int | None = None) -> ExploreReport:
    """Play each of ``task_ids`` ``samples`` times with ``engine``; append each episode to ``store``.

    Episodes already in ``store`` are skipped (resume); duplicates in ``task_ids`` are played once.
    ``make_env`` is called at most ``concurrency`` times, lazily; the environments are closed at the end.
    With a sampling seed, round ``r`` of the call samples with seed ``gen.seed + r``. With ``samples > 1``
    each record has a ``sample`` field (0 .. samples-1) and ``report.trajectories`` lists every sample of
    a task together, tasks in order. ``max_steps`` ends every episode after that many steps, below the
    environment's own limit (a shorter, cheaper run; the reward is the one reached by then).
    """
    job = ExploreJob(make_env, task_ids, Path(store), samples, max_steps)
    return explore_many([job], engine, gen, concurrency, progress)[0]


def explore_many(jobs: list[ExploreJob], engine: PolicyEngine, gen: GenerationConfig, concurrency: int = 4,
                 progress: bool = True) -> list[ExploreReport]:
    """``explore`` for several environments at once: their episodes share the ``concurrency`` slots and
    every engine call, so a batch holds ScienceWorld and ALFWorld episodes side by side. One report per
    job, in order (``seconds`` is the whole call's; ``engine_retries`` counts every retried call)."""
    for job in jobs:
        if job.samples < 1:
            raise ValueError(f"samples must be ≥ 1, got {job.samples}")
        if job.max_steps is not None and job.max_steps < 1:
            raise ValueError(f"max_steps must be ≥ 1 or None, got {job.max_steps}")
    start = time.time()
    queues, wanted, reports = [], [], []
    for j, job in enumerate(jobs):
        order = list(dict.fromkeys(str(t) for t in job.task_ids))
        keys = [(t, s if job.samples > 1 else None) for t in order for s in range(job.samples)]
        done = set(_stored(job.store)) & set(keys)
        wanted.append(keys)
        reports.append(ExploreReport(trajectories=[], resumed=len(done)))
        queues.append([_Episode(j, t, sample) for t, sample in keys if (t, sample) not in done])
    queue = deque(ep for round_robin in itertools.zip_longest(*queues) for ep in round_robin if ep)
    if queue:
        _Explorer(jobs, engine, gen, min(concurrency, len(queue)), reports).run(queue, progress)
    for job, keys, report in zip(jobs, wanted, reports, strict=True):
        found = _stored(job.store)
        report.trajectories = [found[key] for key in keys if key in found]
        report.seconds = time.time() - start
    return reports


def _stored(store: Path) -> dict[tuple[str, int | None], Trajectory]:
    """The first stored record of each (task id, sample number or None)."""
    first: dict[tuple[str, int | None], Trajectory] = {}
    for i, record in enumerate(read_jsonl_tolerant(store)):
        trajectory = trajectory_from_record(record, "explored", str(store), i)
        first.setdefault((trajectory.key, trajectory.extra.get("sample")), trajectory)
    return first


class _Explorer:
    """The loop of ``explore``: slots of episodes, one engine call per round, envs stepped in threads."""

    def __init__(self, jobs, engine, gen, concurrency, reports):
        self.jobs = jobs
        self.engine = engine
        self.gen = gen
        self.reports = reports
        self.envs: list[TextEnv | None] = [None] * concurrency
        self.env_job: list[int | None] = [None] * concurrency  # the job whose environment a slot holds
        self.idle: dict[int, list[TextEnv]] = {j: [] for j in range(len(jobs))}  # set aside by slots
        self.slots: list[_Episode | None] = [None] * concurrency

    def run(self, queue: deque[_Episode], progress: bool) -> None:
        from tqdm import tqdm

        bar = tqdm(total=len(queue), desc="explore", unit="episode", disable=not progress)
        start = time.time()
        try:
            with ThreadPoolExecutor(len(self.slots)) as pool:
                loop = self._run_continuous if hasattr(self.engine, "submit") else self._run_rounds
                loop(queue, pool, bar, start)
        finally:
            bar.close()
            for env in self.envs + [e for idle in self.idle.values() for e in idle]:
                if env is not None:
                    env.close()

    def _run_rounds(self, queue: deque[_Episode], pool: ThreadPoolExecutor, bar, start: float) -> None:
        """Lockstep rounds: one batched engine call for every live episode, then every env steps."""
        rounds = steps = 0
        while queue or any(ep is not None for ep in self.slots):
            bar.update(self._fill(queue, pool))
            live = [i for i, ep in enumerate(self.slots) if ep is not None]
            if not live:
                continue
            replies = self._generate([self.slots[i].conversation() for i in live], self._round_config(rounds))
            for i, ids in zip(live, getattr(self.engine, "last_token_ids", None) or [], strict=False):
                self.slots[i].reply_ids.append(list(ids))
            rounds += 1
            results = self._map(pool, self._step, live, replies)
            for i in live:
                self.reports[self.slots[i].job].env_steps += 1
            steps += len(live)
            bar.update(sum(self._settle(i, r, queue) for i, r in zip(live, results, strict=True)))
            rate = steps / (time.time() - start)
            bar.set_postfix(steps_per_s=f"{rate:.1f}", refresh=False)  # shown at the bar's own pace

    def _run_continuous(self, queue: deque[_Episode], pool: ThreadPoolExecutor, bar, start: float) -> None:
        """Continuous batching: the engine steps token by token; a row whose reply is done goes to its
        environment (in a thread when it is ``parallel_safe``) while the other rows keep decoding, and
        the episode's next prompt joins the running batch as soon as its observation is back."""
        pending: dict[Future, tuple[int, str]] = {}  # env call -> (slot, "reset" | "step")
        keys: list[tuple[int, int] | None] = [None] * len(self.slots)
        steps = 0
        while queue or any(ep is not None for ep in self.slots):
            for i in [i for i, ep in enumerate(self.slots) if ep is None][:len(queue)]:
                self.slots[i] = queue.popleft()
                self._bind_env(i, self.slots[i].job)
                keys[i] = (i, id(self.slots[i]))
                pending[self._env_call(pool, i, self._reset)] = (i, "reset")
            if self.engine.busy:
                for reply in self.engine.step():
                    i = reply.key[0]
                    self.slots[i].reply_ids.append(reply.token_ids)
                    pending[self._env_call(pool, i, self._step, reply.text)] = (i, "step")
                done = [f for f in pending if f.done()]
            else:
                done = list(wait(pending, return_when=FIRST_COMPLETED).done) if pending else []
            for future in done:
                i, kind = pending.pop(future)
                finished = self._after_env_call(i, kind, future.result(), queue)
                steps += kind == "step"
                bar.update(finished)
                if self.slots[i] is None:  # finished, or crashed and queued again
                    self.engine.release(keys[i])
                    keys[i] = None
                    continue
                episode = self.slots[i]
                seed = None if self.gen.seed is None else self.gen.seed + zlib.crc32(
                    f"{episode.task_id}/{episode.sample}/{len(episode.turns)}".encode())
                self.engine.submit(episode.conversation(), self.gen, key=keys[i], seed=seed)
            if done:
                bar.set_postfix(steps_per_s=f"{steps / (time.time() - start):.1f}", refresh=False)

    def _env_call(self, pool: ThreadPoolExecutor, slot: int, fn, *args) -> Future:
        """``fn(slot, *args)`` in a thread when the slot's env is ``parallel_safe``, else right here."""
        if self.envs[slot].parallel_safe:
            return pool.submit(fn, slot, *args)
        future: Future = Future()
        future.set_result(fn(slot, *args))
        return future

    def _after_env_call(self, slot: int, kind: str, result, queue: deque[_Episode]) -> int:
        """Settle a reset or a step of ``slot``; returns the episodes this finished (0/1)."""
        if kind == "reset":
            return self._crashed(slot, queue) if isinstance(result, EnvCrashedError) else 0
        self.reports[self.slots[slot].job].env_steps += 1
        return self._settle(slot, result, queue)

    def _generate(self, conversations: list[list[Message]], gen: GenerationConfig) -> list[str]:
        """One engine call, made again up to ``ENGINE_RETRIES`` times if it raises a retryable error."""
        for attempt in range(ENGINE_RETRIES + 1):
            try:
                return self.engine.generate(conversations, gen)
            except RETRYABLE_ERRORS as error:
                if attempt == ENGINE_RETRIES:
                    stores = ", ".join(str(job.store) for job in self.jobs)
                    raise RuntimeError(f"the policy engine failed {attempt + 1} times in a row; finished "
                                       f"episodes are in {stores}, a rerun resumes after them") from error
                for report in self.reports:
                    report.engine_retries += 1
        raise AssertionError("unreachable")

    def _round_config(self, rounds: int) -> GenerationConfig:
        if self.gen.greedy or self.gen.seed is None:
            return self.gen
        return replace(self.gen, seed=self.gen.seed + rounds)

    def _fill(self, queue: deque[_Episode], pool: ThreadPoolExecutor) -> int:
        """Start queued episodes in the free slots; returns how many episodes this finished (crashes
        recorded as null). Environments are made here, one at a time, and reset in threads."""
        finished = 0
        while queue and None in self.slots:
            free = [i for i, ep in enumerate(self.slots) if ep is None][:len(queue)]
            for i in free:
                self.slots[i] = queue.popleft()
                self._bind_env(i, self.slots[i].job)
            for i, outcome in zip(free, self._map(pool, self._reset, free), strict=True):
                if isinstance(outcome, EnvCrashedError):
                    finished += self._crashed(i, queue)
        return finished

    def _bind_env(self, slot: int, job: int) -> None:
        """Give ``slot`` an environment of ``job``: its own if it has one, else one set aside, else new."""
        if self.envs[slot] is not None and self.env_job[slot] == job:
            return
        if self.envs[slot] is not None:
            self.idle[self.env_job[slot]].append(self.envs[slot])
        idle = self.idle[job]
        self.envs[slot] = idle.pop() if idle else self.jobs[job].make_env()
        self.env_job[slot] = job

    def _map(self, pool: ThreadPoolExecutor, fn, slots: list[int], *args) -> list:
        """``fn`` over ``slots``: in threads when every env involved is ``parallel_safe``, else in turn."""
        if all(self.envs[i].parallel_safe for i in slots):
            return list(pool.map(fn, slots, *args))
        return list(map(fn, slots, *args))

    def _reset(self, slot: int) -> str | EnvCrashedError:
        episode, env = self.slots[slot], self.envs[slot]
        began = time.perf_counter()
        try:
            task = env.reset(episode.task_id)
        except EnvCrashedError as crash:
            return crash
        finally:
            self.reports[episode.job].env_seconds += time.perf_counter() - began
        episode.context, episode.turns = env.prompt.context(task), []
        return task

    def _step(self, slot: int, reply: str) -> Step | EnvCrashedError:
        episode = self.slots[slot]
        began = time.perf_counter()
        try:
            step = self.envs[slot].step(reply)
        except EnvCrashedError as crash:
            return crash
        finally:
            self.reports[episode.job].env_seconds += time.perf_counter() - began
        episode.turns += [message(GPT, reply), message(HUMAN, step.observation)]
        return step

    def _settle(self, slot: int, result: Step | EnvCrashedError, queue: deque[_Episode]) -> int:
        """After a step: store a finished episode and free its slot. Returns episodes finished (0/1)."""
        if isinstance(result, EnvCrashedError):
            return self._crashed(slot, queue)
        episode, env = self.slots[slot], self.envs[slot]
        cap = self.jobs[episode.job].max_steps
        if not result.done and (cap is None or result.steps < cap):
            return 0
        self._record(episode, env.trajectory(extra=_extra(env, episode)))
        self.slots[slot] = None
        return 1

    def _crashed(self, slot: int, queue: deque[_Episode]) -> int:
        """Count the crash, replace the slot's environment, and retry the episode first in line, or
        record it with reward null after ``MAX_RETRIES`` retries. Returns episodes finished (0/1)."""
        episode, env = self.slots[slot], self.envs[slot]
        self.reports[episode.job].crashes += 1
        self.slots[slot], self.envs[slot], self.env_job[slot] = None, None, None
        with suppress(Exception):  # the engine is dead already; a failing close changes nothing
            env.close()
        if episode.attempt < MAX_RETRIES:
            queue.appendleft(_Episode(episode.job, episode.task_id, episode.sample,
                                      attempt=episode.attempt + 1))
            return 0
        self._record(episode, _crashed_trajectory(episode, env))
        return 1

    def _record(self, episode: _Episode, trajectory: Trajectory) -> None:
        append_jsonl(self.jobs[episode.job].store, trajectory.to_record(with_reward=True))
        report = self.reports[episode.job]
        report.new_episodes += 1
        if episode.reply_ids:
            report.reply_ids[(episode.task_id, episode.sample)] = episode.reply_ids


def _crashed_trajectory(episode: _Episode, env: TextEnv) -> Trajectory:
    """The last attempt as far as it got, in ETO's layout, with reward None (no usable outcome)."""
    head = [message(HUMAN, env.prompt.instruction), message(GPT, ACK)]
    if episode.context:
        head.append(episode.context[-1])  # the task message
    turns = episode.turns[:-1] if episode.turns else []  # the trailing observation is dropped
    return Trajectory(id=episode.task_id, conversations=head + turns, reward=None,
                      extra=_extra(env, episode))


def _extra(env: TextEnv, episode: _Episode) -> dict:
    """The record's fields beyond ETO's: the environment's own, and the sample number when K > 1."""
    extra = dict(env.record_extra(episode.task_id))
    if episode.sample is not None:
        extra["sample"] = episode.sample
    return extra


def evaluate(make_env: Callable[[], TextEnv], engine: PolicyEngine, task_ids: list[str], store: Path,
             gen: GenerationConfig | None = None, concurrency: int = 4, progress: bool = True) -> EvalResult:
    """Play ``task_ids`` (a test split) greedily, as ETO evaluates, and score them; ``gen`` sets
    ``max_new_tokens`` (ETO: 512), its decoding is forced to greedy. ``store`` makes it resumable."""
    gen = replace(gen or GenerationConfig(), greedy=True)
    report = explore(make_env, engine, task_ids, store, gen, concurrency=concurrency, progress=progress)
    return summarise(report.trajectories)


def summarise(trajectories: list[Trajectory]) -> EvalResult:
    """ETO's metrics over ``trajectories``. Success is reward 1.0 (ALFWorld won, ScienceWorld score
    100). A reward of None (the environment kept crashing) counts as 0: a failure, not a skipped task.
    Each task is scored once: a task id that appears twice raises ValueError."""
    by_task: dict[str, float] = {}
    for t in trajectories:
        if t.key in by_task:
            raise ValueError(f"task {t.key!r} has two trajectories; an evaluation scores each task once")
        by_task[t.key] = float(t.reward) if t.reward is not None else 0.0
    rewards = list(by_task.values())
    if not rewards:
        return EvalResult(average_reward_x100=0.0, success_rate=0.0, n=0)
    return EvalResult(average_reward_x100=100.0 * sum(rewards) / len(rewards),
                      success_rate=sum(r == 1.0 for r in rewards) / len(rewards), n=len(rewards),
                      rewards=by_task)
