"""Cut the records of one global batch into micro-batches whose packed token tree fits a token budget.

Contract. The input is the records (DPO pairs or SFT sequences) of *one optimiser step*. Their order
within the step does not change the step's gradient as long as the loss is normalised over the global
batch (not per micro-batch), so the planner may reorder them: by default it sorts records by their first
sequence's tokens, which puts pairs of one task and of one instruction next to each other and so
maximises what each micro-batch shares. The output is a list of micro-batches, each a list of indices
into the input, every index exactly once.

Cost model. A micro-batch's size is exactly the token count ``N`` of its :func:`pack_tree` layout: for
sorted sequences, ``sum(len) - sum(LCP of sorted neighbours)``. Inserting one sequence into a sorted set
costs its length minus its longest LCP with its two sorted neighbours, so a micro-batch is grown
incrementally (``bisect`` on ``memcmp``-ordered byte keys, numpy LCPs): ``O(total tokens)`` numpy work
plus ``O(records * log(records per micro-batch))`` Python steps. Records are placed greedily in order;
a record that does not fit closes the micro-batch and opens the next.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence

import numpy as np

from fasteto.data.tokenized import TokenizedPair, TokenizedSequence
from fasteto.packing.tree import group_bytes, ids_bytes, key_array, shared_tokens

Record = TokenizedPair | TokenizedSequence


def record_keys(record: Record, group: int) -> list[bytes]:
    """Sort keys of a record's full sequences, as ``pack_pairs`` / ``pack_sequences`` lay them out
    (a pair: prompt + chosen, prompt + rejected)."""
    head = group_bytes(group)
    if isinstance(record, TokenizedPair):
        prompt = ids_bytes(record.prompt_ids, (record.id, "prompt"))
        return [head + prompt + ids_bytes(record.chosen_ids, (record.id, "chosen")),
                head + prompt + ids_bytes(record.rejected_ids, (record.id, "rejected"))]
    if isinstance(record, TokenizedSequence):
        return [head + ids_bytes(record.input_ids, record.id)]
    raise TypeError(f"cannot plan a {type(record).__name__}; expected TokenizedPair or TokenizedSequence")


def _all_keys(records: Sequence[Record], share_across: bool) -> list[list[bytes]]:
    # Without sharing across records each record is its own group, so the LCP across records is 0.
    return [record_keys(r, 0 if share_across else i) for i, r in enumerate(records)]


def _tree_tokens(keys: list[bytes]) -> int:
    """Tokens of the radix tree of ``keys``: ``sum(len) - sum(LCP of sorted neighbours)``."""
    arrays = [key_array(k) for k in sorted(keys)]
    total = sum(a.size - 1 for a in arrays)
    return total - sum(shared_tokens(a, b) for a, b in zip(arrays[:-1], arrays[1:], strict=True))


def packed_size(records: Sequence[Record], *, share_across: bool = True) -> int:
    """Tokens ``N`` of the layout ``pack_pairs`` / ``pack_sequences`` would build for ``records``."""
    return _tree_tokens([k for keys in _all_keys(records, share_across) for k in keys])


class _OpenBatch:
    """The micro-batch being filled: its sequences' keys kept sorted, and its exact tree size."""

    def __init__(self) -> None:
        self.keys: list[bytes] = []
        self.arrays: list[np.ndarray] = []
        self.members: list[int] = []
        self.size = 0

    def insert(self, key: bytes) -> tuple[int, int]:
        """Insert a key; returns (its position, tokens it adds to the tree)."""
        pos = bisect.bisect_right(self.keys, key)
        arr = key_array(key)
        share = shared_tokens(self.arrays[pos - 1], arr) if pos > 0 else 0
        if pos < len(self.arrays):
            share = max(share, shared_tokens(arr, self.arrays[pos]))
        self.keys.insert(pos, key)
        self.arrays.insert(pos, arr)
        return pos, arr.size - 1 - share

    def add(self, index: int, keys: list[bytes], budget: int) -> bool:
        """Add record ``index`` if the tree stays within ``budget``; otherwise leave the batch as it was."""
        placed, cost = [], 0
        for key in keys:
            pos, added = self.insert(key)
            placed.append(pos)
            cost += added
        if self.size + cost <= budget:
            self.members.append(index)
            self.size += cost
            return True
        for pos in reversed(placed):
            del self.keys[pos], self.arrays[pos]
        return False


def _oversized(record: Record, size: int, budget: int) -> ValueError:
    kind, limits = (("pair", "max_prompt / max_target") if isinstance(record, TokenizedPair)
                    else ("sequence", "max_length"))
    return ValueError(
        f"{kind} {record.id!r} alone packs to {size} tokens, more than token_budget={budget}. Fix: raise "
        f"the token budget, or lower the maximum length ({limits}) so that every {kind} fits."
    )


def plan_micro_batches(records: Sequence[Record], token_budget: int, *, share_across: bool = True,
                       sort: bool = True) -> list[list[int]]:
    """Micro-batches of one global batch whose packed size is at most ``token_budget`` tokens each.

    Args:
        records: the pairs (or sequences) of one optimiser step (see the module docstring).
        token_budget: the most tokens one micro-batch's tree may hold (after sharing).
        share_across: must match the packer's ``share_across``; False counts no sharing across records.
        sort: True orders records by their tokens first (more sharing); False keeps the given order,
            so micro-batches are consecutive runs of records.

    Returns:
        Micro-batches as lists of indices into ``records``; every index appears exactly once. The result
        depends only on the records' tokens and the arguments.
    Raises ValueError naming a record that alone exceeds the budget.
    """
    if isinstance(token_budget, bool) or not isinstance(token_budget, int) or token_budget < 1:
        raise ValueError(f"token_budget must be a positive integer, got {token_budget!r}")
    keys = _all_keys(records, share_across)
    # [4:]: sort on the tokens, not the group, so share_across=False orders records the same way.
    order = sorted(range(len(records)), key=lambda i: keys[i][0][4:]) if sort else range(len(records))
    batches: list[list[int]] = []
    current = _OpenBatch()
    for i in order:
        if current.add(i, keys[i], token_budget):
            continue
        if current.members:
            batches.append(current.members)
            current = _OpenBatch()
            if current.add(i, keys[i], token_budget):
                continue
        raise _oversized(records[i], _tree_tokens(keys[i]), token_budget)
    if current.members:
        batches.append(current.members)
    return batches
