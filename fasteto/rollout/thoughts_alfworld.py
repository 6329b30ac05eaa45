"""ALFWorld thoughts, from the task message and the observations so far.

The task sentence gives the goal (six ALFRED task types, twelve phrasings); the observations give where
the agent stands, what it holds, what it has changed and where it saw what. The thought for the next
action says what that action is for in those terms: what to find and the sub-goals at the start, "there
is no X here; next I will check R" while searching, "I see X here; I will take it" when it shows up,
and the next sub-goal once it is held. Nothing but the history is read.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from fasteto.rollout.seen import History

_THING = r"[a-z]+ \d+"
_GOALS = [(re.compile(p + r"\.?$"), kind) for p, kind in (
    (r"put a clean (?P<obj>\w+) (?P<prep>in|on) (?P<target>\w+)", "clean"),
    (r"clean some (?P<obj>\w+) and put it (?P<prep>in|on) (?P<target>\w+)", "clean"),
    (r"put a hot (?P<obj>\w+) (?P<prep>in|on) (?P<target>\w+)", "heat"),
    (r"heat some (?P<obj>\w+) and put it (?P<prep>in|on) (?P<target>\w+)", "heat"),
    (r"put a cool (?P<obj>\w+) (?P<prep>in|on) (?P<target>\w+)", "cool"),
    (r"cool some (?P<obj>\w+) and put it (?P<prep>in|on) (?P<target>\w+)", "cool"),
    (r"put two (?P<obj>\w+) (?P<prep>in|on) (?P<target>\w+)", "two"),
    (r"find two (?P<obj>\w+) and put them (?P<prep>in|on) (?P<target>\w+)", "two"),
    (r"examine the (?P<obj>\w+) with the (?P<lamp>\w+)", "light"),
    (r"look at (?P<obj>\w+) under the (?P<lamp>\w+)", "light"),
    (r"put (?:a|an|some) (?P<obj>\w+) (?P<prep>in|on) (?P<target>\w+)", "place"),
)]
_TOOL = {"clean": "sinkbasin", "heat": "microwave", "cool": "fridge"}
_DONE = {"clean": "clean", "heat": "hot", "cool": "cool"}

_VIEW_ON = re.compile(rf"On the (?P<at>{_THING}), you see (?P<items>.*)")
_VIEW_IN = re.compile(rf"(?:You open the {_THING}\. )?The (?P<at>{_THING}) is open\. "
                      rf"In it, you see (?P<items>.*)")
_CLOSED = re.compile(rf"The (?P<at>{_THING}) is closed\.")
_TAKEN = re.compile(rf"You pick up the (?P<obj>{_THING}) from the (?P<at>{_THING})\.")
_PUT = re.compile(rf"You put the (?P<obj>{_THING}) in/on the (?P<at>{_THING})\.")
_CHANGED = re.compile(rf"You (?:clean|heat|cool) the (?P<obj>{_THING}) using the {_THING}\.")
_ITEM = re.compile(rf"\ban? ({_THING})")


@dataclass(frozen=True)
class Goal:
    """The task sentence, parsed: ``kind`` is clean, heat, cool, two, light or place."""

    kind: str
    obj: str
    target: str = ""
    prep: str = "in"
    lamp: str = ""


def parse_goal(task: str) -> Goal | None:
    """The goal of a task message ("...Your task is to: put a clean pan in countertop."); None when the
    sentence is not one of ALFWorld's phrasings."""
    sentence = task.rpartition("Your task is to: ")[2].strip()
    for pattern, kind in _GOALS:
        match = pattern.match(sentence)
        if match:
            return Goal(kind, **match.groupdict())
    return None


@dataclass
class Scene:
    """What the history shows about the room now."""

    at: str | None = None  # the receptacle the agent stands at, "drawer 1"
    held: str | None = None  # the object in hand, "apple 1"
    changed: set[str] = field(default_factory=set)  # objects cleaned, heated or cooled
    placed: int = 0  # task objects put in/on a receptacle of the target type
    seen: dict[str, tuple[str, str]] = field(default_factory=dict)  # object -> (receptacle, "on"|"in")
    view: tuple[str, str, list[str]] | None = None  # the last observation's (receptacle, prep, objects)
    closed: str | None = None  # the receptacle the last observation says is closed
    last: str = ""  # the last action


def read_scene(history: History, goal: Goal | None) -> Scene:
    scene = Scene()
    for action, text in zip(history.actions, history.observations, strict=True):
        scene.view, scene.closed, scene.last = None, None, action
        if action.startswith("go to ") and text != "Nothing happens.":
            scene.at = action[len("go to "):]
        view = (_VIEW_ON.match(text), "on") if text.startswith("On the ") else (_VIEW_IN.match(text), "in")
        if view[0]:
            at, items = view[0]["at"], _ITEM.findall(view[0]["items"])
            scene.seen = {o: place for o, place in scene.seen.items() if place[0] != at}
            scene.seen.update({o: (at, view[1]) for o in items})
            scene.view = (at, view[1], items)
        elif match := _CLOSED.match(text):
            scene.closed = match["at"]
        elif match := _TAKEN.match(text):
            scene.held = match["obj"]
            scene.seen.pop(match["obj"], None)
        elif match := _PUT.match(text):
            if goal and _name(match["obj"]) == goal.obj and _name(match["at"]) == goal.target:
                scene.placed += 1
            scene.held = None
        elif match := _CHANGED.match(text):
            scene.changed.add(match["obj"])
    return scene


def thought(history: History, action: str) -> str | None:
    """The thought before ``action``, or None to fall back to the action-only template."""
    goal = parse_goal(history.task)
    if goal is None:
        return None
    if not history.actions:
        return _opening(goal, action)
    scene = read_scene(history, goal)
    verb, _, rest = action.partition(" ")
    if action.startswith("go to "):
        return _go(goal, scene, action[len("go to "):])
    if verb == "take" and (match := re.fullmatch(rf"({_THING}) from ({_THING})", rest)):
        return _take(goal, scene, match[1], match[2])
    if verb == "put" and (match := re.fullmatch(rf"({_THING}) in/on ({_THING})", rest)):
        return _put(goal, scene, match[1], match[2])
    if verb == "open":
        return _open(goal, scene, rest)
    if verb == "close":
        return _close(goal, scene, rest)
    if verb in _DONE and (match := re.fullmatch(rf"({_THING}) with ({_THING})", rest)):
        return f"I am at the {match[2]} with the {match[1]}; I will {verb} it here."
    if verb == "use" and goal.kind == "light" and scene.held:
        return f"I have the {scene.held} and the {rest} is here; I will turn it on and look at the " \
               f"{scene.held} under it."
    return None


def _opening(goal: Goal, action: str) -> str:
    plan = {
        "place": f"find {_a(goal.obj)}, take it, and put it {goal.prep} the {goal.target}",
        "two": f"find two {_plural(goal.obj)} and put them {goal.prep} the {goal.target}, one at a time",
        "light": f"find {_a(goal.obj)}, take it to {_a(goal.lamp)}, and turn the {goal.lamp} on to look "
                 f"at the {goal.obj}",
    }.get(goal.kind) or (f"find {_a(goal.obj)}, {goal.kind} it with the {_TOOL[goal.kind]}, and put it "
                         f"{goal.prep} the {goal.target}")
    first = (f"First I need to find {_a(goal.obj)}; I will start with the {action[len('go to '):]}."
             if action.startswith("go to ") else f"First I will {action}.")
    return f"To solve the task, I need to {plan}. {first}"


def _wanted(goal: Goal, scene: Scene) -> str | None:
    """The kind of thing being searched for now, or None when the task object is in hand and only a
    place to bring it to remains."""
    if scene.held is None or _name(scene.held) != goal.obj:
        return goal.obj
    return goal.lamp if goal.kind == "light" else None


def _go(goal: Goal, scene: Scene, place: str) -> str:
    wanted = _wanted(goal, scene)
    if wanted is None:
        return _bring(goal, scene, place)
    for thing, (at, prep) in sorted(scene.seen.items()):
        if at == place and _name(thing) == wanted:
            if wanted == goal.lamp:
                return (f"I have the {scene.held}, and I saw the {thing} {prep} the {place} earlier; I will "
                        f"go there to use it.")
            some = f"another {wanted}" if goal.kind == "two" and scene.placed else _a(wanted)
            return f"I saw {some} {prep} the {place} earlier; I will go back there for it."
    next_check = f"Next I will check the {place}."
    if goal.kind == "two" and scene.placed == 1 and scene.last.startswith("put "):
        return f"One {goal.obj} is {goal.prep} the {goal.target}; now I need a second one. {next_check}"
    if scene.view:
        at, prep, items = scene.view
        if any(_name(o) == wanted for o in items):
            return f"I will go to the {place} next."
        looking_for_obj = goal.kind == "light" and wanted == goal.obj
        lamp = [o for o in items if _name(o) == goal.lamp] if looking_for_obj else []
        if lamp:
            return f"There is no {wanted} {prep} the {at}, but the {lamp[0]} is there for later. {next_check}"
        return f"There is no {wanted} {prep} the {at}. {next_check}"
    if wanted == goal.lamp and scene.held:
        return f"Now I have the {scene.held}. Next I need to find {_a(goal.lamp)}; I will check the {place}."
    return f"I still need to find {_a(wanted)}. {next_check}"


def _bring(goal: Goal, scene: Scene, place: str) -> str:
    """Going somewhere with the task object in hand: to change it, or to put it at the target."""
    held = scene.held
    have = f"Now the {held} is {_DONE[goal.kind]}." if held in scene.changed else f"Now I have the {held}."
    if goal.kind in _TOOL and held not in scene.changed:
        if _name(place) == _TOOL[goal.kind]:
            return f"{have} Next I need to {goal.kind} it, so I will go to the {place}."
    elif _name(place) == goal.target:
        return f"{have} Next I need to put it {goal.prep} the {goal.target}, so I will go to the {place}."
    return f"{have} I will go to the {place}."


def _take(goal: Goal, scene: Scene, thing: str, place: str) -> str:
    prep = scene.view[1] if scene.view and scene.view[0] == place else "at"
    if _name(thing) != goal.obj:
        return f"I will take the {thing} from the {place}."
    here = f"I see the {thing} {prep} the {place}; I will take it"
    if goal.kind == "two":
        return f"{here} as my {'first' if scene.placed == 0 else 'second'} {goal.obj}."
    return here + "."


def _put(goal: Goal, scene: Scene, thing: str, place: str) -> str:
    if _name(thing) != goal.obj or _name(place) != goal.target:
        return f"I will put the {thing} {goal.prep} the {place}."
    if goal.kind == "two":
        if scene.placed == 0:
            return f"I will put the {thing} {goal.prep} the {place}; then I need to find a second {goal.obj}."
        return f"This is the second {goal.obj}; I will put it {goal.prep} the {place} to finish the task."
    state = f"The {thing} is {_DONE[goal.kind]} now" if thing in scene.changed else f"I have the {thing}"
    return f"{state} and I am at the {place}, so I will put it {goal.prep} the {place}."


def _open(goal: Goal, scene: Scene, place: str) -> str:
    closed = f"The {place} is closed; " if scene.closed == place else ""
    wanted = _wanted(goal, scene)
    if wanted is not None:
        return f"{closed}I will open it to look for {_a(wanted)}." if closed else \
            f"I will open the {place} to look for {_a(wanted)}."
    if _name(place) == goal.target:
        return f"{closed}I will open it so that I can put the {scene.held} in it."
    return f"{closed}I will open it." if closed else f"I will open the {place}."


def _close(goal: Goal, scene: Scene, place: str) -> str:
    wanted = _wanted(goal, scene)
    viewed = scene.view is not None and scene.view[0] == place
    if wanted and viewed and not any(_name(o) == wanted for o in scene.view[2]):
        return f"There is no {wanted} in the {place}; I will close it and look elsewhere."
    return f"I will close the {place}."


def _name(thing: str) -> str:
    """"apple 1" -> "apple"."""
    return thing.rsplit(" ", 1)[0]


def _a(word: str) -> str:
    return f"{'an' if word[:1] in 'aeiou' else 'a'} {word}"


def _plural(word: str) -> str:
    if word.endswith(("s", "x", "ch", "sh")):
        return word + "es"
    if word.endswith("y") and word[-2:-1] not in "aeiou":
        return word[:-1] + "ies"
    return word + "s"
