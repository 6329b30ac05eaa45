"""The packed layout: many sequences as one padding-free token tree.

Sequences that start with the same tokens (every ETO conversation of an environment opens with the same
instruction exchange; a DPO pair's chosen and rejected share their prompt and often their first turns)
store and compute that prefix once. The sequences of a micro-batch form a radix tree of *segments*: runs
of tokens laid out contiguously; a segment's tokens follow the tokens of its parent segment in every
sequence that passes through it.

Names used in shapes below:

- ``N``: tokens in the layout (each shared token counted once).
- ``S``: segments. Segment ``s`` holds tokens ``cu_seqlens[s]:cu_seqlens[s+1]``; segments are in
  depth-first order, so a parent always comes before its children (``parent[s] < s``).
- ``Nk``: key/value slots of the gathered-KV view (a segment's ancestors' tokens, then its own).
- ``Q``: sequences (root-to-segment paths), the things log-probs are summed for.
- ``M``: log-prob entries: one per (hidden row, target token) the loss needs. Each entry's target is one
  layout token (a node's children start with different tokens), so ``M ≤ N − roots``.
- ``K``: contributions of entries to sequences (an entry in a shared segment counts for every sequence
  through it).

Attention rule (what every backend computes): token ``i`` attends to token ``j`` iff ``j`` is in an
ancestor segment of ``seg(i)``, or in the same segment with ``j <= i``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class PackedBatch:
    """One micro-batch as a token tree. All tensors are on one device; index tensors are long unless
    said otherwise.

    Tokens:
        input_ids: ``[N]``. position_ids: ``[N]``, the token's position in its own sequence (a child
        segment's first position is its parent's last position + 1). segment_ids: ``[N]`` int32.
    Segments:
        cu_seqlens: ``[S + 1]`` int32, segment boundaries in the token layout (0 first, N last).
        parent: ``[S]``, the parent segment, ``-1`` for a root.
        max_seqlen: int, the longest segment.
    Gathered-KV view (for varlen kernels: segment ``s`` queries its own tokens against keys
    ``kv_index[cu_seqlens_k[s]:cu_seqlens_k[s+1]]``, causal aligned bottom-right):
        kv_index: ``[Nk]``, token indices: the ancestors' tokens root first, then the segment's own.
        cu_seqlens_k: ``[S + 1]`` int32. max_seqlen_k: int.
    Log-probs (only where the loss needs them):
        logp_rows: ``[M]``, the token whose hidden state predicts the target.
        logp_targets: ``[M]``, the target token id.
        contrib_entry: ``[K]`` (into ``M``) and contrib_seq: ``[K]`` (into ``Q``): entry
        ``contrib_entry[k]`` adds to the sum of sequence ``contrib_seq[k]``.
    Sequences:
        num_sequences: ``Q``. seq_keys: length ``Q``, what each sequence is (e.g. ``(pair_index,
        "chosen")``), as the packer chose.
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    segment_ids: torch.Tensor
    cu_seqlens: torch.Tensor
    parent: torch.Tensor
    max_seqlen: int
    kv_index: torch.Tensor
    cu_seqlens_k: torch.Tensor
    max_seqlen_k: int
    logp_rows: torch.Tensor
    logp_targets: torch.Tensor
    contrib_entry: torch.Tensor
    contrib_seq: torch.Tensor
    num_sequences: int
    seq_keys: list[Any] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.numel())

    @property
    def num_segments(self) -> int:
        return int(self.parent.numel())

    def to(self, device: torch.device | str) -> PackedBatch:
        """A copy with every tensor on ``device``."""
        moved = {name: (value.to(device) if isinstance(value, torch.Tensor) else value)
                 for name, value in vars(self).items()}
        return PackedBatch(**moved)

    def sequence_sums(self, entry_values: torch.Tensor) -> torch.Tensor:
        """Sum per-entry values (``[M]``, e.g. token log-probs) into per-sequence values ``[Q]`` float32.
        Differentiable in ``entry_values``."""
        out = torch.zeros(self.num_sequences, dtype=torch.float32, device=entry_values.device)
        return out.index_add(0, self.contrib_seq, entry_values.float()[self.contrib_entry])

    def sequence_token_counts(self) -> torch.Tensor:
        """Model tokens per sequence, ``[Q]`` long (for length-normalised losses)."""
        ones = torch.ones_like(self.contrib_seq)
        return torch.zeros(self.num_sequences, dtype=torch.long,
                           device=self.contrib_seq.device).index_add(0, self.contrib_seq, ones)

    def dense_attention_mask(self) -> torch.Tensor:
        """The attention rule (module docstring) as a dense ``[N, N]`` bool mask, ``[i, j]`` True when
        token ``i`` attends to token ``j``. Quadratic: a reference for tests and small batches."""
        ancestors = torch.zeros(self.num_segments, self.num_segments, dtype=torch.bool)
        for s, p in enumerate(self.parent.tolist()):  # parents come first, so their rows are complete
            if p >= 0:
                ancestors[s] = ancestors[p]
            ancestors[s, s] = True
        seg = self.segment_ids.long().cpu()
        index = torch.arange(self.num_tokens)
        causal = (seg[:, None] != seg[None, :]) | (index[None, :] <= index[:, None])
        return (ancestors[seg][:, seg] & causal).to(self.input_ids.device)

    def validate(self) -> None:
        """Check the layout's invariants: shapes and dtypes, segments in depth-first order, positions
        continuing the parent's, each segment's gathered keys = its parent's then its own tokens, and
        log-prob indices in range. Raises ValueError naming the first broken one."""
        _check_tokens(self)
        _check_segments(self)
        _check_kv(self)
        _check_entries(self)


def _fail(what: str) -> None:
    raise ValueError(f"invalid PackedBatch: {what}")


def _check_tokens(b: PackedBatch) -> None:
    n = b.num_tokens
    for name in ("input_ids", "position_ids", "segment_ids"):
        t = getattr(b, name)
        if t.dim() != 1 or t.numel() != n:
            _fail(f"{name} has shape {tuple(t.shape)}, expected ({n},)")
    for name, dtype in (("input_ids", torch.long), ("position_ids", torch.long), ("segment_ids", torch.int32),
                        ("cu_seqlens", torch.int32), ("parent", torch.long), ("kv_index", torch.long),
                        ("cu_seqlens_k", torch.int32), ("logp_rows", torch.long),
                        ("logp_targets", torch.long), ("contrib_entry", torch.long),
                        ("contrib_seq", torch.long)):
        if getattr(b, name).dtype != dtype:
            _fail(f"{name} is {getattr(b, name).dtype}, expected {dtype}")


def _check_segments(b: PackedBatch) -> None:
    cu, parent, s_count = b.cu_seqlens.long().cpu(), b.parent.cpu(), b.num_segments
    if s_count == 0 or cu.numel() != s_count + 1 or cu[0] != 0 or cu[-1] != b.num_tokens:
        _fail(f"cu_seqlens {cu.tolist()[:8]}... must be [S + 1] from 0 to N={b.num_tokens}, S={s_count} ≥ 1")
    lens = cu.diff()
    if bool((lens <= 0).any()):
        _fail("cu_seqlens must be strictly increasing (no empty segment)")
    if bool(((parent < -1) | (parent >= torch.arange(s_count))).any()):
        _fail("parent[s] must be -1 or a segment before s (depth-first order)")
    if b.max_seqlen != int(lens.max()):
        _fail(f"max_seqlen is {b.max_seqlen}, the longest segment has {int(lens.max())} tokens")
    if not torch.equal(b.segment_ids.long().cpu(), torch.repeat_interleave(torch.arange(s_count), lens)):
        _fail("segment_ids do not match cu_seqlens")
    pos = b.position_ids.cpu()
    first = cu[:-1]
    start = torch.where(parent >= 0, pos[(cu[1:][parent.clamp(min=0)] - 1)] + 1, 0)
    expected = torch.arange(b.num_tokens) - torch.repeat_interleave(first - start, lens)
    if not torch.equal(pos, expected):
        _fail("position_ids must count on from 0 at a root and from the parent's last position + 1")


def _check_kv(b: PackedBatch) -> None:
    cu, cu_k, parent = b.cu_seqlens.long().cpu(), b.cu_seqlens_k.long().cpu(), b.parent.cpu()
    kv, pos = b.kv_index.cpu(), b.position_ids.cpu()
    if cu_k.numel() != b.num_segments + 1 or cu_k[0] != 0 or cu_k[-1] != kv.numel():
        _fail("cu_seqlens_k must be [S + 1] from 0 to the length of kv_index")
    if b.max_seqlen_k != int(cu_k.diff().max()):
        _fail(f"max_seqlen_k is {b.max_seqlen_k}, the longest key range has {int(cu_k.diff().max())}")
    for s, p in enumerate(parent.tolist()):
        keys = kv[cu_k[s]:cu_k[s + 1]]
        before = kv[cu_k[p]:cu_k[p + 1]] if p >= 0 else kv[:0]
        expected = torch.cat([before, torch.arange(cu[s], cu[s + 1])])
        if not torch.equal(keys, expected):
            _fail(f"segment {s}: kv_index must be its parent's keys then its own tokens")
    if not torch.equal(pos[kv[cu_k[1:] - 1]] + 1, cu_k.diff()):
        _fail("each key range must hold as many keys as its segment's last position + 1")


def _check_entries(b: PackedBatch) -> None:
    m, k = b.logp_rows.numel(), b.contrib_entry.numel()
    if b.logp_targets.numel() != m or b.contrib_seq.numel() != k:
        _fail("logp_rows / logp_targets and contrib_entry / contrib_seq must have equal lengths")
    for name, t, high in (("logp_rows", b.logp_rows, b.num_tokens), ("contrib_entry", b.contrib_entry, m),
                          ("contrib_seq", b.contrib_seq, b.num_sequences)):
        if t.numel() and (int(t.min()) < 0 or int(t.max()) >= high):
            _fail(f"{name} must lie in [0, {high})")
    if b.seq_keys and len(b.seq_keys) != b.num_sequences:
        _fail(f"{len(b.seq_keys)} seq_keys for {b.num_sequences} sequences")
