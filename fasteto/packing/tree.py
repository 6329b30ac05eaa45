"""Build one :class:`PackedBatch` from token sequences: the radix tree of their shared prefixes.

Sequences are sorted lexicographically (as big-endian uint32 byte strings, so ``bytes`` comparison is a
``memcmp``), then each one is inserted by the usual stack construction from sorted strings and the
longest common prefix (LCP) of sorted neighbours: ``O(total tokens)`` after the sort. Segments are split
so that every sequence ends at a segment boundary; two identical sequences share one path and stay two
sequences.

What may be shared is the caller's choice: each sequence may carry a *group*; sequences of different
groups never share a token (the group is a leading sort key whose LCP is zero across groups). No groups
means one group: everything that can be shared is.

Log-prob entries: the target token at position ``t`` of a sequence is a token ``j`` of the layout, and
``j`` alone fixes the entry (its row is the token before it on its path: ``j - 1`` inside a segment, the
parent's last token at a segment's start; a node's children start with distinct tokens). So an entry is
a layout token that some sequence through it counts, and dedup is exact: a (row, target) pair used by
several sequences is one entry with several contributions.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import Any

import numpy as np
import torch

from fasteto.data.tokenized import TokenizedPair, TokenizedSequence
from fasteto.packing.layout import PackedBatch

SequenceSpec = tuple[Any, Sequence[int], Sequence[bool]]  # (key, input_ids, loss_mask)

_U4 = np.dtype(">u4")  # big-endian: bytes order == numeric lexicographic order


def ids_bytes(ids: Sequence[int], what: Any) -> bytes:
    """Token ids as big-endian uint32 bytes; ``what`` names the sequence in the error raised for an id
    outside ``[0, 2**32)``."""
    try:
        body = np.asarray(ids, dtype=np.int64)
        if body.ndim != 1 or (body.size and (body.min() < 0 or body.max() >= 2**32)):
            raise ValueError
        return body.astype(_U4).tobytes()
    except (OverflowError, TypeError, ValueError):
        raise ValueError(f"sequence {what!r}: token ids must be a flat list of integers in [0, 2**32); "
                         f"got {list(ids)[:8]}...") from None


def group_bytes(group: int) -> bytes:
    """The leading element of a sort key: sequences of different groups share nothing."""
    return group.to_bytes(4, "big")


def key_array(key: bytes) -> np.ndarray:
    """``[1 + L]`` uint32 view of a key: the group, then the ids (in native byte order only equality means
    anything; ``.view(">u4")`` reads the values)."""
    return np.frombuffer(key, dtype=np.uint32)


def shared_tokens(a: np.ndarray, b: np.ndarray) -> int:
    """Tokens two keys (``key_array`` views) share at their start; 0 when their groups differ."""
    m = min(a.size, b.size)
    diff = np.flatnonzero(a[:m] != b[:m])
    lcp = int(diff[0]) if diff.size else m
    return max(lcp - 1, 0)


class _Node:
    """A radix-tree node: tokens ``[start, end)`` of the sequence with input index ``rep``."""

    __slots__ = ("start", "end", "rep", "parent", "children")

    def __init__(self, start: int, end: int, rep: int, parent: _Node | None):
        self.start, self.end, self.rep, self.parent = start, end, rep, parent
        self.children: list[_Node] = []


def _split(node: _Node, at: int, roots: list[_Node]) -> _Node:
    """Cut ``node`` at depth ``at``: a new upper node takes ``[start, at)``; ``node`` keeps the rest, its
    children and the sequences ending in it. ``node`` is the last child of its parent (it lies on the
    rightmost path of the sorted insertion), so the replacement is ``siblings[-1]``."""
    upper = _Node(node.start, at, node.rep, node.parent)
    siblings = node.parent.children if node.parent is not None else roots
    siblings[-1] = upper
    upper.children.append(node)
    node.start, node.parent = at, upper
    return upper


def _radix_tree(arrays: list[np.ndarray], order: list[int]) -> tuple[list[_Node], list[_Node]]:
    """Roots of the radix tree of the sorted sequences, and each sequence's end node (by input index)."""
    roots: list[_Node] = []
    stack: list[_Node] = []
    ends: list[_Node | None] = [None] * len(arrays)
    prev = None
    for q in order:
        length = arrays[q].size - 1
        lcp = 0 if prev is None else shared_tokens(arrays[prev], arrays[q])
        while stack and stack[-1].start >= lcp:
            stack.pop()
        if stack and stack[-1].end > lcp:
            stack[-1] = _split(stack[-1], lcp, roots)
        if length > lcp:
            parent = stack[-1] if stack else None
            node = _Node(lcp, length, q, parent)
            (parent.children if parent is not None else roots).append(node)
            stack.append(node)
        ends[q] = stack[-1]
        prev = q
    return roots, ends  # type: ignore[return-value]


def _preorder(roots: list[_Node]) -> list[_Node]:
    out, todo = [], list(reversed(roots))
    while todo:
        node = todo.pop()
        out.append(node)
        todo.extend(reversed(node.children))
    return out


def _group_ranks(groups: Sequence[Hashable] | None, count: int) -> list[int]:
    if groups is None:
        return [0] * count
    if len(groups) != count:
        raise ValueError(f"groups has {len(groups)} entries for {count} sequences; give one per sequence")
    ranks: dict[Hashable, int] = {}
    return [ranks.setdefault(g, len(ranks)) for g in groups]


def _check_sequences(sequences: Sequence[SequenceSpec]) -> None:
    if not sequences:
        raise ValueError("cannot pack an empty list of sequences")
    for key, ids, mask in sequences:
        if len(ids) != len(mask):
            raise ValueError(f"sequence {key!r}: {len(ids)} token ids but {len(mask)} loss-mask entries")
        if len(ids) == 0:
            raise ValueError(f"sequence {key!r} has no tokens; every packed sequence needs at least one")


def pack_tree(sequences: Sequence[SequenceSpec], *, groups: Sequence[Hashable] | None = None) -> PackedBatch:
    """Lay sequences out as one token tree, shared prefixes stored once.

    Args:
        sequences: ``Q`` triples ``(key, input_ids, loss_mask)``; ``input_ids`` ints in ``[0, 2**32)``,
            ``loss_mask`` bools of the same length, True on the tokens whose log-prob counts (position 0
            never counts: nothing predicts it). Sequence ``q`` of the batch is ``sequences[q]``.
        groups: optional, one hashable per sequence; sequences share tokens only with sequences of the
            same group. None: one group (share everything shareable).

    Returns:
        A :class:`PackedBatch` (segments in depth-first order, children in token order); ``seq_keys``
        are the given keys. See the module docstring for the log-prob entries.
    """
    _check_sequences(sequences)
    ranks = _group_ranks(groups, len(sequences))
    keys = [group_bytes(g) + ids_bytes(ids, key) for (key, ids, _), g in zip(sequences, ranks, strict=True)]
    arrays = [key_array(k) for k in keys]
    order = sorted(range(len(keys)), key=keys.__getitem__)
    roots, ends = _radix_tree(arrays, order)
    nodes = _preorder(roots)
    seg_of = {id(node): s for s, node in enumerate(nodes)}
    batch = _layout(nodes, seg_of, arrays)
    end_segments = [seg_of[id(node)] for node in ends]
    _add_logp_entries(batch, sequences, end_segments)
    batch.seq_keys = [key for key, _, _ in sequences]
    return batch


def _layout(nodes: list[_Node], seg_of: dict[int, int], arrays: list[np.ndarray]) -> PackedBatch:
    """Token, segment and gathered-KV tensors of the preorder ``nodes``; log-prob fields left empty."""
    starts = np.array([n.start for n in nodes], dtype=np.int64)
    lens = np.array([n.end - n.start for n in nodes], dtype=np.int64)
    parent = np.array([-1 if n.parent is None else seg_of[id(n.parent)] for n in nodes], dtype=np.int64)
    cu = np.zeros(len(nodes) + 1, dtype=np.int64)
    np.cumsum(lens, out=cu[1:])
    n_tokens = int(cu[-1])
    # +1: the key arrays hold the group in element 0.
    pieces = [arrays[n.rep][n.start + 1:n.end + 1] for n in nodes]
    input_ids = np.concatenate(pieces).view(_U4).astype(np.int64)
    seg_ids = np.repeat(np.arange(len(nodes)), lens)
    position_ids = np.arange(n_tokens) - cu[:-1][seg_ids] + starts[seg_ids]
    paths: list[np.ndarray] = []
    for s, p in enumerate(parent.tolist()):
        own = np.arange(cu[s], cu[s + 1])
        paths.append(own if p < 0 else np.concatenate([paths[p], own]))
    cu_k = np.zeros(len(nodes) + 1, dtype=np.int64)
    np.cumsum([path.size for path in paths], out=cu_k[1:])
    empty = torch.zeros(0, dtype=torch.long)
    return PackedBatch(
        input_ids=torch.from_numpy(input_ids), position_ids=torch.from_numpy(position_ids),
        segment_ids=torch.from_numpy(seg_ids.astype(np.int32)),
        cu_seqlens=torch.from_numpy(cu.astype(np.int32)), parent=torch.from_numpy(parent),
        max_seqlen=int(lens.max()), kv_index=torch.from_numpy(np.concatenate(paths)),
        cu_seqlens_k=torch.from_numpy(cu_k.astype(np.int32)),
        max_seqlen_k=int(max(path.size for path in paths)),
        logp_rows=empty, logp_targets=empty, contrib_entry=empty, contrib_seq=empty, num_sequences=0,
    )


def _add_logp_entries(batch: PackedBatch, sequences: Sequence[SequenceSpec], end_segments: list[int]) -> None:
    """Fill the log-prob entries and contributions (module docstring) into ``batch``."""
    kv, cu_k = batch.kv_index.numpy(), batch.cu_seqlens_k.numpy()
    targets, owners = [], []
    for q, ((_, _, mask), s) in enumerate(zip(sequences, end_segments, strict=True)):
        path = kv[cu_k[s]:cu_k[s + 1]]  # layout token of each position of sequence q
        counted = np.flatnonzero(np.asarray(mask, dtype=bool)[1:]) + 1
        targets.append(path[counted])
        owners.append(np.full(counted.size, q, dtype=np.int64))
    target_tok = np.concatenate(targets)
    n_tokens = batch.num_tokens
    needed = np.zeros(n_tokens, dtype=bool)
    needed[target_tok] = True
    entry_tok = np.flatnonzero(needed)
    entry_of = np.full(n_tokens, -1, dtype=np.int64)
    entry_of[entry_tok] = np.arange(entry_tok.size)
    cu, parent = batch.cu_seqlens.numpy().astype(np.int64), batch.parent.numpy()
    row_of = np.arange(n_tokens) - 1
    child = np.flatnonzero(parent >= 0)
    row_of[cu[child]] = cu[parent[child] + 1] - 1  # a segment's first token follows its parent's last
    batch.logp_rows = torch.from_numpy(row_of[entry_tok])
    batch.logp_targets = torch.from_numpy(batch.input_ids.numpy()[entry_tok])  # numpy: no torch threads
    batch.contrib_entry = torch.from_numpy(entry_of[target_tok])
    batch.contrib_seq = torch.from_numpy(np.concatenate(owners))
    batch.num_sequences = len(sequences)


# ------------------------------------------------------------------------------ records


def pair_sequences(pair: TokenizedPair) -> list[SequenceSpec]:
    """The two full sequences of a pair: ``(pair.id, "chosen")`` then ``(pair.id, "rejected")``, each
    ``prompt_ids + continuation`` with the mask False on the prompt."""
    out = []
    for side, ids, mask in (("chosen", pair.chosen_ids, pair.chosen_mask),
                            ("rejected", pair.rejected_ids, pair.rejected_mask)):
        full_mask = [False] * len(pair.prompt_ids) + list(mask)
        if not any(full_mask[1:]):
            raise ValueError(f"pair {pair.id!r}: {side} has no model token to train on (tokenisation "
                             "drops such pairs, so this one was built or truncated elsewhere)")
        out.append(((pair.id, side), list(pair.prompt_ids) + list(ids), full_mask))
    return out


def pack_pairs(pairs: Sequence[TokenizedPair], *,
               share_across: bool = True) -> tuple[PackedBatch, torch.Tensor, torch.Tensor]:
    """Pack DPO pairs as one token tree.

    Args:
        pairs: ``B`` pairs. share_across: True shares prefixes across pairs (the instruction exchange,
            a task asked twice); False shares only within a pair (its prompt and the common start of
            chosen and rejected).

    Returns:
        ``(batch, chosen_index, rejected_index)``: index tensors ``[B]`` long into ``batch``'s ``Q = 2B``
        sequences (sequence ``2b`` is pair ``b``'s chosen, ``2b + 1`` its rejected).
    Raises ValueError naming the pair when its chosen or rejected has no model token.
    """
    specs = [spec for pair in pairs for spec in pair_sequences(pair)]
    groups = None if share_across else [i // 2 for i in range(len(specs))]
    batch = pack_tree(specs, groups=groups)
    chosen = torch.arange(0, 2 * len(pairs), 2, dtype=torch.long)
    return batch, chosen, chosen + 1


def pack_sequences(seqs: Sequence[TokenizedSequence], *, share_across: bool = True) -> PackedBatch:
    """Pack SFT sequences as one token tree; sequence ``q`` of the batch is ``seqs[q]``. ``share_across``
    False lays each sequence out on its own (no sharing at all). Raises ValueError naming a sequence
    that has no model token."""
    for seq in seqs:
        if not any(seq.loss_mask[1:]):
            raise ValueError(f"sequence {seq.id!r} has no model token to train on (tokenisation drops "
                             "such sequences, so this one was built or truncated elsewhere)")
    specs = [(seq.id, seq.input_ids, seq.loss_mask) for seq in seqs]
    return pack_tree(specs, groups=None if share_across else list(range(len(specs))))
