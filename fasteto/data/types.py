"""The two records ETO's files hold: a trajectory (SFT and explored files) and a DPO pair.

Messages stay in ETO's on-disk shape, ``{"from": "human" | "gpt", "value": str}``, so that what is
read is what is written, byte for byte, and no conversion layer can drift.

A stored trajectory is laid out as ETO lays it out::

    [0] human  the instruction            \
    [1] gpt    the acknowledgement ("OK")  /  the instruction exchange
    [2] human  the task message
    [3] gpt    "Thought: ...\nAction: ..."
    [4] human  "Observation: ..."
    ...        alternating, ending with a gpt message

The in-context example shown while exploring is not part of it, and a trailing observation is dropped.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

HUMAN = "human"
GPT = "gpt"

Message = dict  # {"from": "human" | "gpt", "value": str}

INSTRUCTION_LEN = 2  # messages in the instruction exchange
TASK_INDEX = 2  # position of the task message


EXAMPLE = "example"  # key marking the in-context example's messages in an engine's context


def message(role: str, value: str) -> Message:
    return {"from": role, "value": value}


def example_message(role: str, value: str) -> Message:
    """A message of the one-shot in-context example: rendered like any other, but marked, so that a
    context cap (``rollout.engine.encode_prompt``) can drop the example as a whole and tell the task
    message from it."""
    return {"from": role, "value": value, EXAMPLE: True}


@dataclass
class Trajectory:
    """One conversation of an SFT, expert or explored file.

    ``reward`` is None when the file gives none: for an expert item that means 1.0 (METHOD.md); for an
    explored item it means the episode has no usable outcome and is skipped by the pair builder.
    ``extra`` keeps any other keys of the record (``game_file`` for ALFWorld) for an exact round trip.
    """

    id: Any
    conversations: list[Message]
    reward: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def key(self) -> str:
        """The id as a string, the key pairs are matched on (ETO's ids are str or int)."""
        return str(self.id)

    def to_record(self, with_reward: bool) -> dict[str, Any]:
        record: dict[str, Any] = {"id": self.id}
        record.update(self.extra)
        record["conversations"] = self.conversations
        if with_reward or self.reward is not None:
            record["reward"] = self.reward
        return record


@dataclass
class Pair:
    """One DPO record: a shared prompt and two continuations of it."""

    id: Any
    prompt: list[Message]
    chosen: list[Message]
    rejected: list[Message]

    def to_record(self) -> dict[str, Any]:
        return {"id": self.id, "prompt": self.prompt, "chosen": self.chosen, "rejected": self.rejected}
