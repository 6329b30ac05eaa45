"""Token-level records: what tokenisation hands the trainer. Lists, not tensors, so they pickle and
store cheaply; the trainer (or packing) lays them out as tensors."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass
class TokenizedSequence:
    """One conversation as tokens. ``loss_mask[i]`` is True exactly on the model's own tokens (its
    replies and their end-of-turn token); ``len(input_ids) == len(loss_mask)``."""

    id: Any
    input_ids: list[int]
    loss_mask: list[bool]


@dataclass
class TokenizedPair:
    """One DPO pair as tokens: a shared prompt and two continuations of it.

    The full chosen sequence is ``prompt_ids + chosen_ids`` (same for rejected); masks cover only the
    continuation and are True exactly on model tokens.
    """

    id: Any
    prompt_ids: list[int]
    chosen_ids: list[int]
    chosen_mask: list[bool]
    rejected_ids: list[int]
    rejected_mask: list[bool]
