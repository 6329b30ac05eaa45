"""ScienceWorld thoughts, from the task description and the observations so far.

The task description names the goal, often the object to focus on and the rooms involved, and the
rule for a conditional answer ("If it is electrically conductive, place it in the blue box."). The
thought for the next action ties it to those: a move says which part of the task sends the agent
there, a focus says which of the task's "focus on" the object answers, a pick-up says that the object
is in view and why it matters, a conditional answer quotes its rule and the last reading. Nothing but
the history is read.
"""

from __future__ import annotations

import re

from fasteto.rollout.seen import History, Known, segments

_ARRIVED = re.compile(r"You (?:teleport|move) to the (.+)\.$")
_DEVICE = re.compile(r"\ban? ([\w ]*?(?:light bulb|buzzer|motor)), which is (on|off)\b")
_READING = re.compile(r"the thermometer measures a temperature of (-?[\d.]+) degrees celsius")
_FOCUS = re.compile(r"focus on (?:the )?(.+?)(?=[.,]|$)", re.IGNORECASE)
_FIND = re.compile(r"find an?(?:\(n\))? (.+?)(?=[.,]|$)")


def thought(history: History, action: str) -> str | None:
    """The thought before ``action``, or None to fall back to the action-only template."""
    body = _body(history, action)
    if body is not None and not history.actions:
        return f"My task is to {_goal(history.task)}. {body}"
    return body


def _body(history: History, action: str) -> str | None:
    verb, _, rest = action.partition(" ")
    if action == "look around":
        return _look(history)
    if verb in ("teleport", "go") and rest.startswith("to "):
        return _move(history, rest[3:])
    if action.startswith("pick up "):
        return _pick_up(history, _seen_name(history, action[len("pick up "):]))
    if action.startswith("focus on "):
        return _focus(history, _seen_name(history, action[len("focus on "):]))
    if verb == "move" and " to " in rest:
        thing, _, place = rest.partition(" to ")
        return _move_to(history, _seen_name(history, thing), _name(place))
    if verb == "use" and " on " in rest:
        tool, _, thing = rest.partition(" on ")
        if "thermometer" in tool:
            return f"I will measure the temperature of the {_name(thing)} with the thermometer."
        return f"I will use the {_name(tool)} on the {_name(thing)}."
    if verb == "connect" and " to " in rest:
        one, _, other = rest.partition(" to ")
        return f"To build the circuit, I will connect the {one} to the {other}."
    if verb.startswith("wait"):
        if history.actions and history.actions[-1].startswith("wait"):
            return "It needs more time; I will keep waiting."
        return "This needs time to happen; I will wait."
    simple = {
        "open": "I will open the {0} to see what is inside.",
        "close": "I will close the {0}.",
        "activate": "I will turn on the {0}.",
        "deactivate": "I will turn off the {0}.",
        "examine": "I will examine the {0} to check its state.",
        "read": "The {0} may say how to do this; I will read it.",
        "mix": "The ingredients are in the {0}; I will mix them.",
        "drop": "I will put the {0} down here.",
    }
    if verb in simple and rest:
        return simple[verb].format(_name(rest))
    return None


def _look(history: History) -> str:
    if not history.actions:
        return "First I will look around to see where I am and what is here."
    arrived = _ARRIVED.match(history.last_observation)
    if arrived:
        return f"I am in the {arrived[1]} now; I will look around to see what is here."
    return "I will look around again to see what has changed."


def _move(history: History, room: str) -> str:
    clause = _task_part(history.task, room)
    if clause:
        return f"The task says {clause}, so I will go to the {room}."
    need = _next_focus(history)
    if need and need != "thing" and not Known(history.texts()).knows(need):
        return f"I need the {need}, which I have not seen yet; I will look for it in the {room}."
    return f"To {_goal(history.task)}, I will go to the {room} next."


def _pick_up(history: History, thing: str) -> str:
    here = _in_view(history, thing)
    why = ""
    recipe = [t for t in history.observations if t.startswith("The recipe reads")]
    if recipe and Known(recipe).knows(thing):
        why = "the recipe needs it"
    elif Known([history.task]).knows(thing):
        why = "the task mentions it"
    if here and why:
        return f"I see the {thing} here, and {why}; I will pick it up."
    if here:
        return f"I see the {thing} here; I will pick it up."
    if why:
        source = "The recipe needs" if why.startswith("the recipe") else "The task mentions"
        return f"{source} the {thing}; I will pick it up."
    return f"I will pick up the {thing} to take it with me."


def _focus(history: History, thing: str) -> str:
    targets = _FOCUS.findall(history.task)
    done = sum(a.startswith("focus on ") for a in history.actions)
    target = _matching(targets, thing, done)
    rule = _rule(history.task, f"focus on the {target}") if target else None
    if rule:
        return f"{_reading(history)}The task says: {rule}. So I will focus on the {thing}."
    if target and target != "thing":
        return f"The task asks me to focus on the {target}; I will focus on the {thing} now."
    wanted = _FIND.search(history.task)
    if wanted:
        return f"The {thing} is {_a(wanted[1])}, which the task asks me to find; I will focus on it."
    if targets:
        return f"The task asks me to focus on the {targets[min(done, len(targets) - 1)]}; I think that " \
               f"is the {thing}."
    return f"The {thing} is what the task is about; I will focus on it."


def _move_to(history: History, thing: str, place: str) -> str:
    rule = _rule(history.task, place)
    if rule:
        return f"{_reading(history) or _device(history)}The task says: {rule}. So I will move the {thing} " \
               f"to the {place}."
    clause = _task_part(history.task, place)
    if clause:
        return f"The task says {clause}; I will move the {thing} to the {place}."
    return f"I will move the {thing} to the {place}."


# Reading the task --------------------------------------------------------------------------------


def _goal(task: str) -> str:
    """"Your task is to boil water. ..." -> "boil water"."""
    first = re.split(r"(?<=[a-z)'])\. ", task.strip(), maxsplit=1)[0].rstrip(".")
    return first.removeprefix("Your task is to ").strip()


def _sentences(task: str) -> list[str]:
    return [s.strip().rstrip(".") for s in re.split(r"(?<=[a-z)'])\.\s+", task.strip()) if s.strip()]


def _task_part(task: str, words: str) -> str | None:
    """The first clause of the task, past its goal, that names ``words``, lower-cased: "the metal pot is
    located around the kitchen". A "which" clause takes the thing it is about as subject ("measure the
    melting point of lead, which is located around the kitchen" -> "lead is located around the kitchen")."""
    clauses = [re.split(r",\s+", sentence) for sentence in _sentences(task)]
    clauses[0] = clauses[0][:1] + [_subject(clauses[0][0]) + c[len("which"):] for c in clauses[0][1:]
                                   if c.startswith("which ")]
    for clause in [c for sentence in clauses for c in sentence][1:]:
        if Known([clause]).knows(words) and len(clause.split()) > len(words.split()):
            return clause[0].lower() + clause[1:]
    return None


def _subject(clause: str) -> str:
    """The thing a goal clause ends on: "measure the melting point of lead" -> "lead"."""
    return re.split(r" (?:of|the) ", clause)[-1]


def _rule(task: str, words: str) -> str | None:
    """The task's conditional sentence ("If ..., place it in the blue box") that names ``words``."""
    for sentence in _sentences(task):
        if sentence.startswith("If ") and Known([sentence.partition(", ")[2]]).knows(words):
            return sentence[0].lower() + sentence[1:]
    return None


def _next_focus(history: History) -> str | None:
    targets = _FOCUS.findall(history.task)
    done = sum(a.startswith("focus on ") for a in history.actions)
    return targets[done] if done < len(targets) else None


def _matching(targets: list[str], thing: str, done: int) -> str | None:
    """The task's focus target that ``thing`` answers: the next one in order when it names the thing,
    else any that does; None when none does."""
    order = targets[done:done + 1] + targets
    for target in order:
        if target != "thing" and (Known([target]).knows(thing) or Known([thing]).knows(target)):
            return target
    return None


def _reading(history: History) -> str:
    for text in reversed(history.observations):
        match = _READING.search(text)
        if match:
            return f"The thermometer read {match[1]} degrees celsius. "
    return ""


def _device(history: History) -> str:
    """What the last look around says of a circuit's light bulb, buzzer or motor: "The green light bulb
    is on. " (the evidence of a conductivity test)."""
    for action, text in zip(reversed(history.actions), reversed(history.observations), strict=True):
        if action == "look around":
            match = _DEVICE.search(text)
            return f"The {match[1]} is {match[2]}. " if match else ""
    return ""


def _in_view(history: History, thing: str) -> bool:
    """Whether the last look around (or inventory, or examine) since arriving shows ``thing``."""
    for action, text in zip(reversed(history.actions), reversed(history.observations), strict=True):
        if _ARRIVED.match(text):
            return False
        if action in ("look around", "inventory") or action.startswith(("look at ", "examine ")):
            return Known([text]).knows(thing)
    return False


def _seen_name(history: History, slot: str) -> str:
    """An object as the observations last named it, when one listed item has exactly its words
    ("egg parrot" -> "parrot egg"); else as ``_name`` cuts it."""
    name = _name(slot)
    words = Known([name])
    for text in reversed(history.observations):
        for item in segments(text):
            if words.same(item):
                return item
    return name


def _name(slot: str) -> str:
    """An object as the thought names it: ScienceWorld's place and contents qualifiers cut off
    ("metal pot containing nothing in kitchen" -> "metal pot")."""
    return re.split(r" (?:containing|in) ", slot, maxsplit=1)[0]


def _a(phrase: str) -> str:
    return f"{'an' if phrase[:1] in 'aeiou' else 'a'} {phrase}"
