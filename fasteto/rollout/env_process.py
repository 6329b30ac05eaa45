"""An environment in its own process, so that many environments step at once on many cores.

ALFWorld runs TextWorld inside the Python process, with a PDDL parser that is not thread-safe, so in one
process its episodes step one after another. ``ProcessEnv`` puts one environment in a child process and
forwards the calls the explorer makes (``reset``, ``step``, ``trajectory``, ``record_extra``, ``prompt``,
``close``) over a pipe; waiting on a pipe releases the GIL, so the explorer's threads step every child at
once. A child that dies (killed, out of memory, a crash in native code) surfaces as ``EnvCrashedError``,
which the explorer already retries with a fresh environment.

The factory is pickled into a spawned child (no fork of a process that holds torch's thread pools), so it
must be picklable: a module-level function or a ``functools.partial`` of one, e.g.
``functools.partial(make_env, "alfworld", data=path)``.
"""

from __future__ import annotations

import multiprocessing
import pickle
from collections.abc import Callable
from typing import Any

from fasteto.envs.base import EnvCrashedError, Prompt, Step, TextEnv

CLOSE_TIMEOUT_S = 10.0


class ProcessEnv:
    """A ``TextEnv`` made by ``factory`` in a child process; same methods, called over a pipe.

    The child starts at construction; the environment itself is built there (an error building it is
    raised by the first call). ``parallel_safe`` is True: each instance has its own process.
    """

    parallel_safe = True

    def __init__(self, factory: Callable[[], TextEnv], start_method: str = "spawn"):
        ctx = multiprocessing.get_context(start_method)
        self._conn, child = ctx.Pipe()
        self._process = ctx.Process(target=_serve, args=(child, factory), daemon=True,
                                    name="fasteto-env")
        self._process.start()
        child.close()
        self._prompt: Prompt | None = None

    @property
    def pid(self) -> int | None:
        return self._process.pid

    @property
    def prompt(self) -> Prompt:
        if self._prompt is None:
            self._prompt = self._call("prompt")
        return self._prompt

    def reset(self, task_id: str) -> str:
        return self._call("reset", task_id)

    def step(self, reply: str) -> Step:
        return self._call("step", reply)

    def trajectory(self, extra: dict | None = None):
        return self._call("trajectory", extra=extra)

    def record_extra(self, task_id: str) -> dict:
        return self._call("record_extra", task_id)

    def close(self) -> None:
        """Close the environment and end the child (killed if it does not end within 10 s)."""
        if self._process.is_alive():
            try:
                self._conn.send(("close", (), {}))
                if self._conn.poll(CLOSE_TIMEOUT_S):
                    self._conn.recv()
            except (OSError, EOFError):
                pass  # the child is gone already
        self._process.join(CLOSE_TIMEOUT_S)
        if self._process.is_alive():
            self._process.kill()
            self._process.join()
        self._conn.close()

    def _call(self, name: str, *args: Any, **kwargs: Any) -> Any:
        try:
            self._conn.send((name, args, kwargs))
            ok, value = self._conn.recv()
        except (EOFError, OSError) as lost:
            self._process.join(1.0)
            raise EnvCrashedError(
                f"the environment process (pid {self.pid}) ended during {name}() with exit code "
                f"{self._process.exitcode}") from lost
        if not ok:
            raise value
        return value


def _serve(conn, factory: Callable[[], TextEnv]) -> None:
    """The child: build the environment, then answer calls until ``close`` or the pipe closes."""
    env, setup_error = None, None
    try:
        env = factory()
    except Exception as error:  # reported by the first call, where the parent can raise it
        setup_error = error
    while True:
        try:
            name, args, kwargs = conn.recv()
        except (EOFError, OSError):
            break
        if name == "close":
            if env is not None:
                env.close()
            conn.send((True, None))
            break
        if env is None:
            conn.send(_error_reply(setup_error))
            continue
        try:
            value = getattr(env, name)
            conn.send((True, value(*args, **kwargs) if callable(value) else value))
        except Exception as error:
            conn.send(_error_reply(error))


def _error_reply(error: BaseException) -> tuple[bool, BaseException]:
    """The error itself when it pickles, else a RuntimeError that keeps its type and message."""
    try:
        pickle.dumps(error)
        return False, error
    except Exception:
        return False, RuntimeError(f"{type(error).__name__}: {error}")
