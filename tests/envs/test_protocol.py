"""The parts of the ETO protocol that need no engine: reply parsing, prompts, gold-path shortening."""

from __future__ import annotations

import pytest

from fasteto.envs.base import load_prompt, parse_action
from fasteto.envs.sciworld import parse_task_id, shorten_gold_path, split_task_ids, task_id_of


@pytest.mark.parametrize(
    ("reply", "action"),
    [
        ("Thought: go.\nAction: teleport to kitchen", "teleport to kitchen"),
        ("Thought: go. Action: look around", "look around"),
        ("Action:open fridge 1  ", "open fridge 1"),
        ("Thought: a\nAction: go to desk 1\nObservation: made up", "go to desk 1"),
        ("Action: first\nAction: second", "first"),
        ("Thought: I do not know.", None),
        ("Thought: x\nAction:   ", None),
        ("Thought: x\naction: lower case is not the format", None),
        ("", None),
    ],
)
def test_parse_action(reply, action):
    assert parse_action(reply) == action


@pytest.mark.parametrize("env_name", ["sciworld", "alfworld"])
def test_prompt_files_alternate_and_end_with_the_model(env_name):
    prompt = load_prompt(env_name)
    roles = [m["from"] for m in prompt.icl]
    assert roles == ["human", "gpt"] * (len(roles) // 2)
    assert all(parse_action(m["value"]) for m in prompt.icl if m["from"] == "gpt")
    assert "Action:" in prompt.instruction and "Thought:" in prompt.instruction
    context = prompt.context("the task")
    assert context[:2] == [{"from": "human", "value": prompt.instruction}, {"from": "gpt", "value": "OK"}]
    assert context[-1] == {"from": "human", "value": "the task"}


def test_shorten_gold_path():
    gold = ["open door to hallway", "go to hallway", "open door to greenhouse", "go to greenhouse",
            "look around", "focus on pea plant", "go to outside", "go to kitchen", "open cupboard",
            "move pot to cupboard", "teleport to hallway"]
    assert shorten_gold_path(gold) == [
        "teleport to greenhouse", "look around", "focus on pea plant", "teleport to kitchen",
        "open cupboard", "move pot to cupboard", "teleport to hallway"]
    assert shorten_gold_path([]) == []


def test_sciworld_task_ids_follow_eto():
    assert parse_task_id("9_412") == ("task-2a-test-conductivity", 412)
    assert parse_task_id("5_3") == ("task-10-measure-melting-point-(unknown-substance)", 3)
    assert task_id_of("task-1-boil", 21) == "0_21"
    assert [len(split_task_ids(s)) for s in ("train", "seen", "unseen")] == [1483, 194, 211]
    assert split_task_ids("dev") == split_task_ids("seen")
    for bad in ["30_1", "boil", "1_x", "_1"]:
        with pytest.raises(ValueError, match="unknown task id"):
            parse_task_id(bad)
    with pytest.raises(ValueError, match="unknown split 'valid'"):
        split_task_ids("valid")
