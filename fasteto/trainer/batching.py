"""Lay token records out as right-padded tensors, cut them into micro-batches, shuffle per epoch.

This is the plain padded layout of the reference trainer; the packed layout lives in ``fasteto.packing``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

import numpy as np
import torch

from fasteto.data.tokenized import TokenizedPair, TokenizedSequence

T = TypeVar("T")


def _pad(rows: list[tuple[list[int], list[bool]]], pad_id: int) -> dict[str, torch.Tensor]:
    if not rows:
        raise ValueError("cannot pad an empty batch")
    width = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    loss_mask = torch.zeros((len(rows), width), dtype=torch.bool)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (ids, mask) in enumerate(rows):
        if len(ids) != len(mask):
            raise ValueError(f"row {i}: {len(ids)} token ids but {len(mask)} mask entries")
        input_ids[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        loss_mask[i, : len(ids)] = torch.tensor(mask, dtype=torch.bool)
        attention_mask[i, : len(ids)] = 1
    return {"input_ids": input_ids, "loss_mask": loss_mask, "attention_mask": attention_mask}


def pad_sequences(seqs: Sequence[TokenizedSequence], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad SFT sequences to the longest one.

    Returns:
        ``input_ids`` ``[B, T]`` long (``pad_id`` after each sequence), ``loss_mask`` ``[B, T]`` bool
        (the record's mask, False on padding), ``attention_mask`` ``[B, T]`` long (1 on real tokens).
    """
    return _pad([(s.input_ids, s.loss_mask) for s in seqs], pad_id)


def pad_pairs(pairs: Sequence[TokenizedPair], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad DPO pairs as one ``[2B, T]`` batch: rows ``0..B-1`` are the chosen sequences, rows
    ``B..2B-1`` the rejected ones, in the order of ``pairs``.

    Each row is the full sequence ``prompt_ids + continuation``; its loss mask is False on the prompt, the
    pair's continuation mask after it, and False on padding. ``T`` is the longest of all 2B rows.

    Returns:
        ``input_ids`` ``[2B, T]`` long, ``loss_mask`` ``[2B, T]`` bool, ``attention_mask`` ``[2B, T]`` long.
    """
    chosen = [(p.prompt_ids + p.chosen_ids, [False] * len(p.prompt_ids) + p.chosen_mask) for p in pairs]
    rejected = [(p.prompt_ids + p.rejected_ids, [False] * len(p.prompt_ids) + p.rejected_mask) for p in pairs]
    return _pad(chosen + rejected, pad_id)


def micro_batches(items: Sequence[T], micro_batch_size: int) -> list[list[T]]:
    """Consecutive chunks of ``micro_batch_size`` items; the last one may be shorter."""
    if micro_batch_size < 1:
        raise ValueError(f"micro_batch_size must be ≥ 1, got {micro_batch_size}")
    return [list(items[i : i + micro_batch_size]) for i in range(0, len(items), micro_batch_size)]


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The item order of one epoch: a permutation of ``range(n)`` that depends only on ``(seed, epoch)``
    (numpy's SeedSequence over both numbers), so a resumed run replays the same batches."""
    return np.random.default_rng([seed, epoch]).permutation(n).tolist()
