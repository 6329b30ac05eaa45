"""scripts/action_stats.py: actions are read from the model's turns, repeats and verbs counted exactly."""

from __future__ import annotations

import importlib.util
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "action_stats.py"
spec = importlib.util.spec_from_file_location("action_stats", SCRIPT)
action_stats = importlib.util.module_from_spec(spec)
spec.loader.exec_module(action_stats)


def _gpt(text):
    return {"from": "gpt", "value": text}


def test_actions_skip_the_instruction_exchange_and_mark_replies_without_one():
    human = [{"from": "human", "value": v} for v in ("rules", "task", "obs")]
    messages = [human[0], _gpt("Action: rules ok"), human[1], _gpt("Thought: t\nAction: go to desk 1"),
                human[2], _gpt("no format")]
    assert action_stats.actions(messages) == ["go to desk 1", "<no action>"]


def test_line_counts_repeats_focus_and_verbs():
    episodes = [["look around", "look around", "focus on x"], ["go to a", "<no action>"]]
    assert action_stats.line("e", episodes) == (
        "  e                      n=2   actions/episode   2.5  repeats 1    focus 1   "
        "{'look': 2, 'focus': 1, 'go': 1, '<no action>': 1}")


def test_pair_sides_are_read_from_their_first_message():
    assert action_stats.actions([_gpt("Action: open door"), {"from": "human", "value": "ok"}], skip=0) == [
        "open door"]
