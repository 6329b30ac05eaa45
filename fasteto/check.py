"""`fasteto check`: the environments, end to end, before any model is involved.

For each environment: start the engine, replay the expert on a few training tasks through the same
interface the agent uses, send one unparsable reply, and report rewards, steps and speed. It is the
README's main job until the training loop exists.
"""

from __future__ import annotations

import time

from fasteto.envs import EnvSetupError, make_env
from fasteto.rollout.expert import solve


def _available(requested: list[str] | None, alfworld_data: str | None) -> list[str]:
    if requested:
        return requested
    from fasteto.envs.alfworld import find_data

    try:
        find_data(alfworld_data)
    except EnvSetupError as exc:
        print(f"ALFWorld skipped (not asked for explicitly): {exc}\nGoing on with ScienceWorld alone.\n")
        return ["sciworld"]
    return ["sciworld", "alfworld"]


def _check_env(name: str, tasks: int, alfworld_data: str | None) -> bool:
    started = time.time()
    env = make_env(name, **({"data": alfworld_data} if name == "alfworld" else {}))
    print(f"{name}: engine started in {time.time() - started:.1f} s")
    kept = 0
    try:
        for task_id in env.task_ids("train")[:tasks]:
            t0 = time.time()
            trajectory, reason = solve(env, task_id)
            steps = (len(trajectory.conversations) - 3 + 1) // 2 if trajectory else 0
            seconds = time.time() - t0
            status = f"reward {trajectory.reward:.2f}, {steps} steps" if trajectory else f"dropped: {reason}"
            print(f"  {task_id:<60} expert replay: {status}, {seconds:.1f} s")
            kept += trajectory is not None
        env.reset(env.task_ids("train")[0])
        step = env.step("I am not sure what to do.")
        print(f"  an unparsable reply costs a step: steps={step.steps}, "
              f"observation={step.observation[:60]!r}…")
    finally:
        env.close()
    # Solvers miss some tasks (plans over the step limit, gold paths that fall short); none winning
    # means the interface itself is broken.
    return kept > 0


def run_check(envs: list[str] | None, alfworld_data: str | None = None, tasks: int = 3) -> int:
    """Check each environment; returns 0 when each one replayed at least one expert plan to a win."""
    ok = True
    for name in _available(envs, alfworld_data):
        ok = _check_env(name, tasks, alfworld_data) and ok
    print("environments OK" if ok else "some expert replays failed; see above")
    return 0 if ok else 1
