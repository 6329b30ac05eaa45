"""Short thoughts for expert actions, so that expert replies have the Thought/Action shape of the prompt.

ETO's expert thoughts were written by GPT-4, which is not reachable here. These are made from the action
alone: a template per verb that says what the action is for, filled with its objects. They carry no
information beyond the action itself; their job is to teach the reply format, not to reason.
"""

from __future__ import annotations

import re

# (pattern on the action, thought template); the first match wins, groups fill the template.
_SCIWORLD = [
    (r"look around", "I should look around to see what is in this room."),
    (r"(?:teleport|go) to (.+)", "I need to be in the {0} next, so I will go there."),
    (r"open door to (.+)", "The way to the {0} is through its door; I will make sure it is open."),
    (r"open (.+)", "I want to see inside the {0}, so I will open it."),
    (r"close (.+)", "I am done with the {0}; I will close it."),
    (r"pick up (.+)", "I need the {0} for this task, so I will pick it up."),
    (r"focus on (.+)", "The {0} is what the task is about, so I will focus on it."),
    (r"move (.+?) to (.+)", "The next step is to put the {0} in the {1}."),
    (r"pour (.+?) (?:into|in) (.+)", "I will pour the {0} into the {1}."),
    (r"mix (.+)", "Everything is in the {0} now; I will mix it."),
    (r"activate (.+)", "I need the {0} running, so I will switch it on."),
    (r"deactivate (.+)", "The {0} has done its job; I will switch it off."),
    (r"connect (.+?) to (.+)", "To complete the circuit I will connect the {0} to the {1}."),
    (r"disconnect (.+)", "I will disconnect the {0}."),
    (r"use (.+?) on (.+)", "I will use the {0} on the {1} to learn what I need."),
    (r"use (.+)", "I will use the {0}."),
    (r"examine (.+)", "I should examine the {0} to check its state."),
    (r"look at (.+)", "I should look at what the {0} holds."),
    (r"read (.+)", "The {0} may say something useful; I will read it."),
    (r"wait1?", "The process needs time; I will wait."),
]
_ALFWORLD = [
    (r"go to (.+)", "I will go to the {0} and see what is there."),
    (r"take (.+?) from (.+)", "The {0} is what I need; I will take it from the {1}."),
    (r"put (.+?) in/on (.+)", "I have the {0}; now I will put it in/on the {1}."),
    (r"open (.+)", "The {0} is closed; I will open it to look inside."),
    (r"close (.+)", "Nothing I need is in the {0}; I will close it."),
    (r"use (.+)", "I will use the {0}."),
    (r"toggle (.+)", "I will toggle the {0}."),
    (r"clean (.+?) with (.+)", "The {0} has to be clean; I will clean it with the {1}."),
    (r"heat (.+?) with (.+)", "The {0} has to be hot; I will heat it with the {1}."),
    (r"cool (.+?) with (.+)", "The {0} has to be cool; I will cool it with the {1}."),
    (r"examine (.+)", "I will examine the {0} more closely."),
    (r"inventory", "I will check what I am carrying."),
    (r"look", "I will look around me."),
]
_TEMPLATES = {
    "sciworld": [(re.compile(p + r"$"), t) for p, t in _SCIWORLD],
    "alfworld": [(re.compile(p + r"$"), t) for p, t in _ALFWORLD],
}


def thought_for(env_name: str, action: str) -> str:
    """A one-sentence thought for ``action`` in ``env_name``."""
    for pattern, template in _TEMPLATES[env_name]:
        match = pattern.match(action)
        if match:
            return template.format(*match.groups())
    return f"The next step is to {action}."


def expert_reply(env_name: str, action: str) -> str:
    """The reply an expert gives: ``Thought: ...\\nAction: ...``."""
    return f"Thought: {thought_for(env_name, action)}\nAction: {action}"
