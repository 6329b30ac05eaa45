"""The unseen-object check: mentions, known text and flagged steps, written out by hand."""

from __future__ import annotations

from collections import Counter

import pytest

from fasteto.data.types import Trajectory, message
from fasteto.rollout.seen import History, Known, UnseenStep, check_seen, history_of, mentions, unseen_mentions


@pytest.mark.parametrize(("action", "expected"), [
    ("take apple 1 from fridge 1", ["apple 1", "fridge 1"]),
    ("put apple 1 in/on sidetable 2", ["apple 1", "sidetable 2"]),
    ("go to cabinet 10", ["cabinet 10"]),
    ("use thermometer in inventory on unknown substance B in inventory",
     ["thermometer", "unknown substance b"]),
    ("pick up metal pot containing nothing in kitchen", ["metal pot", "kitchen"]),
    ("move flower pot 4 containing apple tree and soil in inventory to purple box",
     ["flower pot 4", "apple tree", "soil", "purple box"]),
    ("connect battery anode to yellow wire terminal 1", ["battery", "yellow wire"]),
    ("connect black wire terminal 2 to cathode in electric motor", ["black wire", "electric motor"]),
    ("teleport to art studio", ["art studio"]),
    ("look around", []),
    ("wait1", []),
    ("inventory", []),
    ("frobnicate the widget", ["widget"]),
])
def test_mentions(action, expected):
    assert mentions(action) == expected


def test_known_needs_every_word_in_one_segment():
    known = Known(["On the countertop 1, you see a apple 1, and a cabinet 20.",
                   "You also see:\n\tA door to the art studio (that is open)"])
    assert known.knows("apple 1") and known.knows("art studio") and known.knows("Countertop 1")
    assert not known.knows("cabinet 2")  # "20" is not "2"
    assert not known.knows("apple 20")  # "apple" and "20" are in different items
    assert Known(["a butterfly egg"]).knows("egg butterfly egg") and not known.knows("butterfly")


def test_unseen_mentions_look_only_at_the_history():
    history = History("Your task is to: put a apple in fridge.\nyou see a fridge 1, and a countertop 1.")
    assert unseen_mentions(history, "go to countertop 1") == []
    assert unseen_mentions(history, "take apple 1 from countertop 1") == ["apple 1"]
    history = history.then("go to countertop 1", "Observation: On the countertop 1, you see a apple 1.")
    assert unseen_mentions(history, "take apple 1 from countertop 1") == []


def test_flagged_steps_of_a_trajectory():
    conv = [message("human", "instruction"), message("gpt", "OK"),
            message("human", "Your task is to find a(n) animal. The animals are in the 'outside' location."),
            message("gpt", "Thought: t\nAction: teleport to outside"),
            message("human", "Observation: You teleport to the outside."),
            message("gpt", "Thought: t\nAction: focus on egg parrot"),
            message("human", "Observation: You focus on the parrot egg."),
            message("gpt", "Thought: t\nAction: teleport to kitchen"),
            message("human", "Observation: You teleport to the kitchen."),
            message("gpt", "Thought: t\nAction: look around")]
    trajectory = Trajectory("21_1", conv)
    last, actions = history_of(trajectory)
    assert actions == ["teleport to outside", "focus on egg parrot", "teleport to kitchen", "look around"]
    assert last.observations == ("You teleport to the outside.", "You focus on the parrot egg.",
                                 "You teleport to the kitchen.")
    report = check_seen([trajectory])
    assert report.examples == [("21_1", UnseenStep(1, "focus on egg parrot", ("egg parrot",))),
                               ("21_1", UnseenStep(2, "teleport to kitchen", ("kitchen",)))]
    counts = (report.trajectories, report.steps, report.flagged_trajectories, report.flagged_steps)
    assert counts == (1, 4, 1, 2)
    assert report.by_verb == Counter({"focus on": 1, "teleport to": 1})
    assert report.summary().splitlines()[0] == (
        "unseen-object check: 2 of 4 steps in 1 of 1 trajectories name something not yet seen")
