"""Environments behind one small interface (see ``base.TextEnv``): ScienceWorld and ALFWorld.

``make_env("sciworld")`` starts a ScienceWorld simulator; ``make_env("alfworld", data=...)`` opens
ALFWorld's games. Engines are imported lazily, so that a missing one only matters when it is asked for.
"""

from __future__ import annotations

from fasteto.envs.base import EnvCrashedError, EnvSetupError, Prompt, Step, TextEnv, parse_action

ENV_NAMES = ("sciworld", "alfworld")


def make_env(name: str, **kwargs) -> TextEnv:
    """Start environment ``name``; ``kwargs`` go to its constructor (``data=`` for ALFWorld)."""
    if name == "sciworld":
        from fasteto.envs.sciworld import SciWorldEnv

        return SciWorldEnv(**kwargs)
    if name == "alfworld":
        from fasteto.envs.alfworld import AlfWorldEnv

        return AlfWorldEnv(**kwargs)
    raise ValueError(f"unknown environment {name!r}; choose one of {', '.join(ENV_NAMES)}")


__all__ = ["ENV_NAMES", "EnvCrashedError", "EnvSetupError", "Prompt", "Step", "TextEnv", "make_env",
           "parse_action"]
