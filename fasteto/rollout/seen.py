"""What an agent has seen at a step, and whether an expert action names only things it has seen.

An expert trajectory teaches each action as the reply to what came before it. An action that names
something the task message and the earlier observations never mentioned (a planner walking straight to
a hidden apple, a gold path picking up a thermometer in a room it never looked at) teaches a guess that
the agent cannot make at test time. ``History`` is what the agent has seen; ``unseen_mentions`` is the
check.

The check, precisely:

1. Mentions. The action is matched against the action templates of ScienceWorld and ALFWorld
   ("take O from R", "move O to C", "teleport to L", ...); each slot is a mention. A mention is cut at
   " in " and " on " (ScienceWorld names a thing by its place: "thermometer in inventory"), at
   " containing " (its contents: "metal pot containing nothing") and at " and "; electrical parts
   ("anode", "cathode", "terminal N") and articles (a, an, the) are removed ("battery anode" ->
   "battery"). A part left empty, "inventory" (the agent's own) and "nothing" need nothing.
2. Known text. The task message and every observation before the step, each cut into segments at
   newlines, tabs and the characters . , ; : ' " -- one listed item or clause per segment (a thing's
   parenthesised state or title stays with it: "A book (Moby Dick) titled Moby Dick by Herman
   Melville").
3. A mention is known when one segment holds every word of it, as whole words in any order, case
   ignored. "cabinet 2" needs the words "cabinet" and "2" in one item ("a cabinet 20" does not do);
   "egg butterfly egg" (ScienceWorld's alias) is known from "a butterfly egg".

Places follow the same rule. In ScienceWorld's "easy" setting the agent may teleport to any room, but a
room counts as known only once the task or an observation has named it ("located around the kitchen",
"A door to the hallway"). ALFWorld's task message lists every receptacle of the room, so "go to R" is
known whenever R is a receptacle of the game. Nothing else counts: not ALFWorld's room layout, not what a
container held before it was opened, not common sense about where thermometers are kept.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass

from fasteto.data.types import GPT, HUMAN, TASK_INDEX, Trajectory
from fasteto.envs.base import parse_action

_OBSERVATION = "Observation: "


@dataclass(frozen=True)
class History:
    """What the agent has seen before its next reply: the task message, its earlier actions, and the
    observation each one got (``observations[i]`` answers ``actions[i]``, without "Observation: ")."""

    task: str
    actions: tuple[str, ...] = ()
    observations: tuple[str, ...] = ()

    def then(self, action: str, observation: str) -> History:
        """This history one step later; ``observation`` may carry the env's "Observation: " prefix."""
        return History(self.task, (*self.actions, action),
                       (*self.observations, observation.removeprefix(_OBSERVATION)))

    @property
    def last_observation(self) -> str:
        return self.observations[-1] if self.observations else ""

    def texts(self) -> tuple[str, ...]:
        """Everything the agent has read: the task message, then the observations in order."""
        return (self.task, *self.observations)


def history_of(trajectory: Trajectory) -> tuple[History, list[str]]:
    """A stored trajectory as the history of its last step and the actions it took: ``actions[i]`` was
    played after ``History(task, actions[:i], observations[:i])``. Replies without an action are skipped
    along with their observation."""
    conv = trajectory.conversations
    actions, observations = [], []
    for i in range(TASK_INDEX + 1, len(conv)):
        if conv[i]["from"] != GPT:
            continue
        action = parse_action(conv[i]["value"])
        if action is None:
            continue
        actions.append(action)
        after = conv[i + 1] if i + 1 < len(conv) and conv[i + 1]["from"] == HUMAN else None
        observations.append(after["value"].removeprefix(_OBSERVATION) if after else "")
    return History(conv[TASK_INDEX]["value"], tuple(actions[:-1]), tuple(observations[:-1])), actions


# Action templates of both environments; the first full match wins and its groups are the mentions.
_TEMPLATES = [re.compile(p + r"$") for p in (
    r"look around", r"look", r"inventory", r"task", r"score", r"wait\d*(?: \d+)?",
    r"(?:teleport|go) to (.+)", r"open door to (.+)", r"close door to (.+)",
    r"take (.+?) from (.+)", r"put (.+?) in/on (.+)", r"(?:clean|heat|cool|slice) (.+?) with (.+)",
    r"move (.+?) to (.+)", r"(?:pour|dunk) (.+?) (?:into|in) (.+)", r"connect (.+?) to (.+)",
    r"use (.+?) on (.+)", r"look (?:at|in) (.+)", r"pick up (.+)", r"put down (.+)", r"focus on (.+)",
    r"(?:open|close|activate|deactivate|disconnect|use|examine|read|eat|flush|drop|mix|toggle) (.+)",
)]
_CUT = re.compile(r" (?:in|on|containing|and) ")
_PARTS = re.compile(r"\b(?:anode|cathode|terminal \d+)\b")
_ARTICLES = frozenset({"a", "an", "the"})
_FREE = frozenset({"inventory", "nothing"})  # need no observation: the agent's own, and emptiness
_SEGMENT = re.compile(r"[\n\t.,;:'\"]+")
_WORD = re.compile(r"[a-z0-9]+")


def _words(text: str) -> frozenset[str]:
    return frozenset(_WORD.findall(text.lower())) - _ARTICLES


def mentions(action: str) -> list[str]:
    """The things an action names, as word groups to look up (step 1 of the module docstring).

    ``"use thermometer in inventory on unknown substance B"`` -> ``["thermometer",
    "unknown substance b"]``; ``"take apple 1 from fridge 1"`` -> ``["apple 1", "fridge 1"]``; an action
    that matches no template (a misspelling) names its words after the verb.
    """
    action = " ".join(action.lower().split())
    for template in _TEMPLATES:
        match = template.match(action)
        if match:
            slots = match.groups()
            break
    else:
        slots = (action.partition(" ")[2],)
    out = []
    for slot in slots:
        for part in _CUT.split(_PARTS.sub(" ", slot)):
            words = _words(part)
            if words and not words <= _FREE:
                out.append(" ".join(w for w in part.split() if w not in _ARTICLES))
    return out


def segments(text: str) -> list[str]:
    """The segments of a text (step 2) without a leading article: "a butterfly egg" -> "butterfly egg"."""
    out = []
    for piece in _SEGMENT.split(text):
        words = piece.split()
        while words and words[0].lower() in _ARTICLES:
            words.pop(0)
        if words:
            out.append(" ".join(words))
    return out


class Known:
    """The segments of the texts an agent has read (step 2), to look mentions up in (step 3)."""

    def __init__(self, texts=()):
        self._segments: list[frozenset[str]] = []
        for text in texts:
            self.add(text)

    def add(self, text: str) -> None:
        self._segments += [words for piece in _SEGMENT.split(text) if (words := _words(piece))]

    def knows(self, mention: str) -> bool:
        words = _words(mention) - _FREE
        return not words or any(words <= segment for segment in self._segments)

    def same(self, text: str) -> bool:
        """Whether ``text`` has exactly the words of one known segment."""
        return _words(text) in self._segments


def unseen_mentions(history: History, action: str) -> list[str]:
    """The mentions of ``action`` that nothing in ``history`` names; empty when the action is observable."""
    known = Known(history.texts())
    return [m for m in mentions(action) if not known.knows(m)]


@dataclass(frozen=True)
class UnseenStep:
    """One flagged step: its 0-based index among the trajectory's actions, the action, what is unseen."""

    step: int
    action: str
    unseen: tuple[str, ...]


def unseen_steps(trajectory: Trajectory) -> list[UnseenStep]:
    """The steps of ``trajectory`` whose action names something not yet seen, in order."""
    last, actions = history_of(trajectory)
    known = Known([last.task])
    flagged = []
    for i, action in enumerate(actions):
        missing = tuple(m for m in mentions(action) if not known.knows(m))
        if missing:
            flagged.append(UnseenStep(i, action, missing))
        if i < len(last.observations):
            known.add(last.observations[i])
    return flagged


@dataclass
class SeenReport:
    """``unseen_steps`` over a set of trajectories: how many, and of which verbs."""

    trajectories: int = 0
    steps: int = 0
    flagged_trajectories: int = 0
    flagged_steps: int = 0
    by_verb: Counter | None = None
    examples: list[tuple[str, UnseenStep]] | None = None  # (trajectory id, step), the first few

    def summary(self) -> str:
        lines = [f"unseen-object check: {self.flagged_steps} of {self.steps} steps in "
                 f"{self.flagged_trajectories} of {self.trajectories} trajectories name something not "
                 "yet seen"]
        lines += [f"  {count} x {verb}" for verb, count in (self.by_verb or Counter()).most_common()]
        return "\n".join(lines)


def check_seen(trajectories: list[Trajectory], examples: int = 5) -> SeenReport:
    """Run ``unseen_steps`` over ``trajectories``; verbs are the action's first two words with numbers
    and names dropped ("teleport to", "pick up", "focus on", "take")."""
    report = SeenReport(by_verb=Counter(), examples=[])
    for trajectory in trajectories:
        flagged = unseen_steps(trajectory)
        report.trajectories += 1
        report.steps += len(history_of(trajectory)[1])
        report.flagged_trajectories += bool(flagged)
        report.flagged_steps += len(flagged)
        for step in flagged:
            report.by_verb[_verb(step.action)] += 1
            if len(report.examples) < examples:
                report.examples.append((trajectory.key, step))
    return report


def _verb(action: str) -> str:
    first, _, rest = action.partition(" ")
    second = rest.partition(" ")[0]
    return f"{first} {second}" if second in ("to", "up", "on", "down", "at", "in") else first
