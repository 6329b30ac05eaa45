"""Thoughts for expert actions, made from what the agent has seen.

ETO's expert thoughts were written by GPT-4, which is not reachable here. Ours are made at each step
from the history alone: the task message, the earlier actions and the observations so far, never the
engine's hidden state or a later observation (``History`` holds exactly that). Each environment's module
reads the task and the observations the way an agent would and says what the next action is for; where
it has nothing to say, a template per verb fills in from the action. The same history and action always
give the same thought.
"""

from __future__ import annotations

import re

from fasteto.rollout import thoughts_alfworld, thoughts_sciworld
from fasteto.rollout.seen import History

_GROUNDED = {"alfworld": thoughts_alfworld.thought, "sciworld": thoughts_sciworld.thought}

# (pattern on the action, template); the first match wins and its groups fill the template.
_FALLBACK = [(re.compile(p + r"$"), t) for p, t in (
    (r"(?:teleport|go) to (.+)", "I will go to the {0}."),
    (r"open (.+)", "I will open the {0}."),
    (r"close (.+)", "I will close the {0}."),
    (r"take (.+?) from (.+)", "I will take the {0} from the {1}."),
    (r"put (.+?) in/on (.+)", "I will put the {0} in/on the {1}."),
    (r"examine (.+)", "I will examine the {0} more closely."),
    (r"use (.+)", "I will use the {0}."),
    (r"inventory", "I will check what I am carrying."),
    (r"look", "I will look around me."),
)]


def thought_for(env_name: str, history: History, action: str) -> str:
    """The thought before ``action``, given what the agent has seen (``history``); one or two sentences."""
    if env_name not in _GROUNDED:
        raise ValueError(f"no expert thoughts for environment {env_name!r}; known: {', '.join(_GROUNDED)}")
    grounded = _GROUNDED[env_name](history, action)
    if grounded is not None:
        return grounded
    for pattern, template in _FALLBACK:
        match = pattern.match(action)
        if match:
            return template.format(*match.groups())
    return f"The next step is to {action}."


def expert_reply(env_name: str, history: History, action: str) -> str:
    """The reply an expert gives: ``Thought: ...\\nAction: ...``."""
    return f"Thought: {thought_for(env_name, history, action)}\nAction: {action}"


__all__ = ["History", "expert_reply", "thought_for"]
