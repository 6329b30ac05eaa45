"""Environments behind one small interface (see ``base.TextEnv``): ScienceWorld and ALFWorld.

``make_env("sciworld")`` starts a ScienceWorld simulator; ``make_env("alfworld", data=...)`` opens
ALFWorld's games. Engines are imported lazily, so that a missing one only matters when it is asked for.
"""

from __future__ import annotations

from fasteto.envs.base import EnvCrashedError, EnvSetupError, Plan, Prompt, Step, TextEnv, parse_action

ENV_NAMES = ("sciworld", "alfworld")


def env_class(name: str) -> type[TextEnv]:
    """The class of environment ``name``, imported on demand."""
    if name == "sciworld":
        from fasteto.envs.sciworld import SciWorldEnv

        return SciWorldEnv
    if name == "alfworld":
        from fasteto.envs.alfworld import AlfWorldEnv

        return AlfWorldEnv
    raise ValueError(f"unknown environment {name!r}; choose one of {', '.join(ENV_NAMES)}")


def make_env(name: str, **kwargs) -> TextEnv:
    """Start environment ``name``; ``kwargs`` go to its constructor (``data=`` for ALFWorld)."""
    return env_class(name)(**kwargs)


__all__ = [
    "ENV_NAMES",
    "EnvCrashedError",
    "EnvSetupError",
    "Plan",
    "Prompt",
    "Step",
    "TextEnv",
    "env_class",
    "make_env",
    "parse_action",
]
