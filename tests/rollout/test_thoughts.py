"""Expert thoughts come from the history alone: hand-written histories, thoughts written out in full."""

from __future__ import annotations

import pytest

from fasteto.envs.base import Plan, TextEnv
from fasteto.rollout.expert import solve
from fasteto.rollout.seen import History
from fasteto.rollout.thoughts import expert_reply, thought_for
from fasteto.rollout.thoughts_alfworld import Goal, parse_goal

ROOM = ("You are in the middle of a room. Looking quickly around you, you see a cabinet 1, a countertop 1, "
        "a fridge 1, a sidetable 1, and a sinkbasin 1.\n\n")
CLEAN_TASK = ROOM + "Your task is to: put a clean apple in sidetable."
TWO_TASK = ROOM + "Your task is to: find two apple and put them in sidetable."
LAMP_TASK = ROOM + "Your task is to: look at apple under the desklamp."


def alf(history: History, action: str) -> str:
    return thought_for("alfworld", history, action)


def steps(task: str, *pairs: tuple[str, str]) -> History:
    history = History(task)
    for action, observation in pairs:
        history = history.then(action, observation)
    return history


@pytest.mark.parametrize(("sentence", "goal"), [
    ("put a clean pan in countertop.", Goal("clean", "pan", "countertop", "in")),
    ("heat some egg and put it in garbagecan.", Goal("heat", "egg", "garbagecan", "in")),
    ("put a cool bowl in microwave.", Goal("cool", "bowl", "microwave", "in")),
    ("find two remotecontrol and put them in ottoman.", Goal("two", "remotecontrol", "ottoman", "in")),
    ("examine the creditcard with the floorlamp.", Goal("light", "creditcard", lamp="floorlamp")),
    ("look at bowl under the desklamp.", Goal("light", "bowl", lamp="desklamp")),
    ("put some book on desk.", Goal("place", "book", "desk", "on")),
])
def test_alfworld_goal_phrasings(sentence, goal):
    assert parse_goal(ROOM + "Your task is to: " + sentence) == goal


def test_alfworld_search_take_clean_put():
    h = History(CLEAN_TASK)
    assert alf(h, "go to countertop 1") == (
        "To solve the task, I need to find an apple, clean it with the sinkbasin, and put it in the "
        "sidetable. First I need to find an apple; I will start with the countertop 1.")
    h = h.then("go to countertop 1", "Observation: On the countertop 1, you see a bread 1, and a knife 1.")
    assert alf(h, "go to cabinet 1") == (
        "There is no apple on the countertop 1. Next I will check the cabinet 1.")
    h = h.then("go to cabinet 1", "The cabinet 1 is closed.")
    assert alf(h, "open cabinet 1") == "The cabinet 1 is closed; I will open it to look for an apple."
    h = h.then("open cabinet 1", "You open the cabinet 1. The cabinet 1 is open. In it, you see a cup 1.")
    assert alf(h, "close cabinet 1") == (
        "There is no apple in the cabinet 1; I will close it and look elsewhere.")
    h = h.then("close cabinet 1", "You close the cabinet 1.")
    assert alf(h, "go to fridge 1") == "I still need to find an apple. Next I will check the fridge 1."
    h = h.then("go to fridge 1", "The fridge 1 is open. In it, you see a apple 2, and a egg 1.")
    assert alf(h, "take apple 2 from fridge 1") == "I see the apple 2 in the fridge 1; I will take it."
    h = h.then("take apple 2 from fridge 1", "You pick up the apple 2 from the fridge 1.")
    assert alf(h, "go to sinkbasin 1") == (
        "Now I have the apple 2. Next I need to clean it, so I will go to the sinkbasin 1.")
    h = h.then("go to sinkbasin 1", "On the sinkbasin 1, you see nothing.")
    assert alf(h, "clean apple 2 with sinkbasin 1") == (
        "I am at the sinkbasin 1 with the apple 2; I will clean it here.")
    h = h.then("clean apple 2 with sinkbasin 1", "You clean the apple 2 using the sinkbasin 1.")
    assert alf(h, "go to sidetable 1") == (
        "Now the apple 2 is clean. Next I need to put it in the sidetable, so I will go to the sidetable 1.")
    h = h.then("go to sidetable 1", "On the sidetable 1, you see a pen 1.")
    assert alf(h, "put apple 2 in/on sidetable 1") == (
        "The apple 2 is clean now and I am at the sidetable 1, so I will put it in the sidetable 1.")


def test_alfworld_goes_back_to_an_object_seen_earlier():
    h = steps(CLEAN_TASK, ("go to countertop 1", "On the countertop 1, you see a apple 1."),
              ("go to cabinet 1", "The cabinet 1 is closed."))
    assert alf(h, "go to countertop 1") == (
        "I saw an apple on the countertop 1 earlier; I will go back there for it.")
    # Once the countertop is seen again without the apple, it is no longer remembered there.
    h = h.then("go to countertop 1", "On the countertop 1, you see nothing.")
    assert alf(h, "go to fridge 1") == (
        "There is no apple on the countertop 1. Next I will check the fridge 1.")


def test_alfworld_pick_two_counts_what_is_placed():
    h = steps(TWO_TASK, ("go to countertop 1", "On the countertop 1, you see a apple 1, and a apple 3."))
    assert alf(h, "take apple 1 from countertop 1") == (
        "I see the apple 1 on the countertop 1; I will take it as my first apple.")
    h = steps(TWO_TASK, *zip(h.actions, h.observations, strict=True),
              ("take apple 1 from countertop 1", "You pick up the apple 1 from the countertop 1."),
              ("go to sidetable 1", "On the sidetable 1, you see nothing."))
    assert alf(h, "put apple 1 in/on sidetable 1") == (
        "I will put the apple 1 in the sidetable 1; then I need to find a second apple.")
    h = h.then("put apple 1 in/on sidetable 1", "You put the apple 1 in/on the sidetable 1.")
    assert alf(h, "go to countertop 1") == (
        "I saw another apple on the countertop 1 earlier; I will go back there for it.")
    assert alf(h, "go to fridge 1") == (
        "One apple is in the sidetable; now I need a second one. Next I will check the fridge 1.")
    h = h.then("go to countertop 1", "On the countertop 1, you see a apple 3.")
    assert alf(h, "take apple 3 from countertop 1") == (
        "I see the apple 3 on the countertop 1; I will take it as my second apple.")
    h = h.then("take apple 3 from countertop 1", "You pick up the apple 3 from the countertop 1.").then(
        "go to sidetable 1", "On the sidetable 1, you see a apple 1.")
    assert alf(h, "put apple 3 in/on sidetable 1") == (
        "This is the second apple; I will put it in the sidetable 1 to finish the task.")


def test_alfworld_lamp_task_remembers_the_lamp():
    h = steps(LAMP_TASK, ("go to sidetable 1", "On the sidetable 1, you see a desklamp 1, and a pen 1."))
    assert alf(h, "go to countertop 1") == (
        "There is no apple on the sidetable 1, but the desklamp 1 is there for later. Next I will check the "
        "countertop 1.")
    h = h.then("go to countertop 1", "On the countertop 1, you see a apple 1.").then(
        "take apple 1 from countertop 1", "You pick up the apple 1 from the countertop 1.")
    assert alf(h, "go to sidetable 1") == (
        "I have the apple 1, and I saw the desklamp 1 on the sidetable 1 earlier; I will go there to use it.")
    h = h.then("go to sidetable 1", "On the sidetable 1, you see a desklamp 1, and a pen 1.")
    assert alf(h, "use desklamp 1") == (
        "I have the apple 1 and the desklamp 1 is here; I will turn it on and look at the apple 1 under it.")


def test_alfworld_unknown_task_falls_back_to_the_verb_template():
    h = History("Your task is to: juggle.")
    assert alf(h, "go to cabinet 1") == "I will go to the cabinet 1."
    assert alf(h, "dance") == "The next step is to dance."
    with pytest.raises(ValueError, match="no expert thoughts for environment 'webshop'"):
        thought_for("webshop", h, "go to cabinet 1")


SCI_TASK = ("Your task is to determine if metal pot is electrically conductive. The metal pot is located "
            "around the kitchen. First, focus on the metal pot. If it is electrically conductive, place it "
            "in the blue box. If it is electrically nonconductive, place it in the orange box.")
KITCHEN = ("This room is called the kitchen. In it, you see: \n\tthe agent\n\ta metal pot (containing "
           "nothing)\n\ta blue box (containing nothing)\nYou also see:\n\tA door to the hallway "
           "(that is open)")


def sci(history: History, action: str) -> str:
    return thought_for("sciworld", history, action)


def test_sciworld_thoughts_follow_the_task_and_what_was_seen():
    h = History(SCI_TASK)
    assert sci(h, "teleport to kitchen") == (
        "My task is to determine if metal pot is electrically conductive. The task says the metal pot is "
        "located around the kitchen, so I will go to the kitchen.")
    h = h.then("teleport to kitchen", "Observation: You teleport to the kitchen.")
    assert sci(h, "look around") == "I am in the kitchen now; I will look around to see what is here."
    assert sci(h, "pick up metal pot") == ( # not looked yet
        "The task mentions the metal pot; I will pick it up.")
    h = h.then("look around", KITCHEN)
    assert sci(h, "pick up metal pot containing nothing in kitchen") == (
        "I see the metal pot here, and the task mentions it; I will pick it up.")
    h = h.then("pick up metal pot", "You move the metal pot to the inventory.")
    assert sci(h, "focus on metal pot in inventory") == (
        "The task asks me to focus on the metal pot; I will focus on the metal pot now.")
    assert sci(h, "move metal pot in inventory to blue box") == (
        "The task says: if it is electrically conductive, place it in the blue box. So I will move the "
        "metal pot to the blue box.")
    assert sci(h, "teleport to hallway") == (
        "To determine if metal pot is electrically conductive, I will go to the hallway next.")
    h = h.then("look around", "In it, you see: \n\ta table. On the table is: a battery, a green light bulb, "
                              "which is on, a red wire.")
    assert sci(h, "move metal pot to blue box") == (
        "The green light bulb is on. The task says: if it is electrically conductive, place it in the blue "
        "box. So I will move the metal pot to the blue box.")


def test_sciworld_find_focus_and_measurements():
    find = ("Your task is to find a(n) animal. First, focus on the thing. Then, move it to the red box in "
            "the kitchen.")
    h = steps(find, ("teleport to outside", "You teleport to the outside."),
              ("look around", "This outside location is called the outside. Here you see:\n\ta "
                              "butterfly egg"))
    assert sci(h, "focus on butterfly") == (
        "The butterfly is an animal, which the task asks me to find; I will focus on it.")
    h = h.then("focus on butterfly", "You focus on the butterfly egg.")
    assert sci(h, "teleport to kitchen") == (
        "The task says move it to the red box in the kitchen, so I will go to the kitchen.")
    lifespan = ("Your task is to find the animal with the longest life span.  The animals are in the "
                "'outside' location.  Focus on the animal with the longest life span.")
    h = steps(lifespan, ("teleport to outside", "You teleport to the outside."),
              ("look around", "Here you see: \n\ta baby beaver\n\ta parrot egg"))
    assert sci(h, "focus on egg parrot") == (  # named as the observation names it
        "The task asks me to focus on the animal with the longest life span; I think that is the parrot egg.")
    melt = ("Your task is to measure the melting point of chocolate. First, focus on the thermometer. Next, "
            "focus on the chocolate. If the melting point of chocolate is above 10.0 degrees celsius, focus "
            "on the blue box. If the melting point of chocolate is below 10.0 degrees celsius, focus on the "
            "orange box.")
    h = steps(melt, ("use thermometer in inventory on chocolate",
                     "the thermometer measures a temperature of 35 degrees celsius"))
    assert sci(h, "focus on blue box") == (
        "The thermometer read 35 degrees celsius. The task says: if the melting point of chocolate is above "
        "10.0 degrees celsius, focus on the blue box. So I will focus on the blue box.")
    assert sci(h, "wait1") == "This needs time to happen; I will wait."
    assert sci(h.then("wait1", "You decide to wait for 1 iterations."), "wait1") == (
        "It needs more time; I will keep waiting.")


class ScriptedEnv(TextEnv):
    """An engine that answers the n-th action with ``observations[n]`` and wins after the last."""

    name = "alfworld"

    def __init__(self, task: str, actions: list[str], observations: list[str]):
        self.task, self.plan, self.script = task, actions, observations
        super().__init__()

    def _start(self):
        pass

    def _load(self, task_id):
        self.n = 0
        return self.task

    def _act(self, action):
        self.n += 1
        return self.script[self.n - 1], float(self.n == len(self.plan)), self.n == len(self.plan), False

    def max_steps(self, task_id):
        return 40

    def expert_plans(self, task_id):
        yield Plan("test", tuple(self.plan))


def test_replay_thoughts_never_see_a_later_observation():
    actions = ["go to countertop 1", "go to cabinet 1", "open cabinet 1", "take apple 1 from cabinet 1"]
    seen = ["On the countertop 1, you see a bread 1.", "The cabinet 1 is closed.",
            "You open the cabinet 1. The cabinet 1 is open. In it, you see a apple 1.",
            "You pick up the apple 1 from the cabinet 1."]
    hidden = seen[:2] + ["You open the cabinet 1. The cabinet 1 is open. In it, you see a apple 1, and a "
                         "egg 2.",
                         "Something else entirely."]
    replies = []
    for observations in (seen, hidden):
        trajectory, reason = solve(ScriptedEnv(CLEAN_TASK, actions, observations), "t")
        assert reason is None and trajectory.extra == {"expert_source": "test"}
        replies.append([m["value"] for m in trajectory.conversations[3::2]])
    # Replies up to the one after the last shared observation are identical.
    assert replies[0][:3] == replies[1][:3]
    assert replies[0][2] == ("Thought: The cabinet 1 is closed; I will open it to look for an apple.\n"
                             "Action: open cabinet 1")
    histories = [History(CLEAN_TASK, tuple(actions[:i]), tuple(seen[:i])) for i in range(3)]
    expected = [expert_reply("alfworld", h, a) for h, a in zip(histories, actions, strict=False)]
    assert replies[0][:3] == expected


def test_same_history_same_thought():
    h = steps(CLEAN_TASK, ("go to countertop 1", "On the countertop 1, you see a bread 1."))
    assert len({alf(h, "go to fridge 1") for _ in range(3)}) == 1
    assert alf(h, "go to fridge 1") == alf(History(h.task, h.actions, h.observations), "go to fridge 1")


def test_sciworld_move_quotes_the_clause_about_the_object():
    task = ("Your task is to measure the melting point of lead, which is located around the kitchen. First, "
            "focus on the thermometer. The boxes are located around the kitchen.")
    h = History(task).then("look around", "This room is called the hallway.")
    assert sci(h, "teleport to kitchen") == (
        "The task says lead is located around the kitchen, so I will go to the kitchen.")
