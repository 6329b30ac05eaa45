"""How many tokens a packing saves: plain (padding-free, unshared) vs packed tree vs padded layout."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

from fasteto.data.tokenized import TokenizedPair
from fasteto.packing.plan import Record, packed_size


@dataclass(frozen=True)
class SharingStats:
    """Token counts of one set of records cut into micro-batches.

    plain_tokens: every full sequence once, no padding, no sharing (a pair counts
        ``len(prompt + chosen) + len(prompt + rejected)``).
    packed_tokens: sum over micro-batches of the packed tree's ``N`` (shared prefixes once).
    padded_tokens: sum over the same micro-batches of the plain padded layout's ``rows * longest row``
        (``[2B, T]`` for pairs, ``[B, T]`` for sequences).
    """

    records: int
    sequences: int
    micro_batches: int
    plain_tokens: int
    packed_tokens: int
    padded_tokens: int

    @property
    def saved_fraction(self) -> float:
        """Share of the plain tokens the tree does not store: ``1 - packed / plain``."""
        return 1.0 - self.packed_tokens / self.plain_tokens if self.plain_tokens else 0.0

    @property
    def padded_over_packed(self) -> float:
        return self.padded_tokens / self.packed_tokens if self.packed_tokens else 0.0

    def as_dict(self) -> dict[str, float | int]:
        return {**asdict(self), "saved_fraction": self.saved_fraction,
                "padded_over_packed": self.padded_over_packed}

    def summary(self) -> str:
        return (f"{self.records} records in {self.micro_batches} micro-batches: {self.plain_tokens} "
                f"plain tokens, {self.packed_tokens} packed ({self.saved_fraction:.1%} saved), "
                f"{self.padded_tokens} padded ({self.padded_over_packed:.2f}x packed)")


def _lengths(record: Record) -> list[int]:
    if isinstance(record, TokenizedPair):
        p = len(record.prompt_ids)
        return [p + len(record.chosen_ids), p + len(record.rejected_ids)]
    return [len(record.input_ids)]


def sharing_stats(records: Sequence[Record], micro_batches: Sequence[Sequence[int]] | None = None, *,
                  share_across: bool = True) -> SharingStats:
    """Token counts (see :class:`SharingStats`) of ``records`` cut into ``micro_batches`` (lists of
    indices into ``records``, e.g. from ``plan_micro_batches``); None: all records in one micro-batch.
    ``share_across`` as for the packer."""
    if micro_batches is None:
        micro_batches = [list(range(len(records)))]
    lengths = [_lengths(r) for r in records]
    plain = sum(sum(ls) for ls in lengths)
    packed = padded = sequences = 0
    for batch in micro_batches:
        rows = [n for i in batch for n in lengths[i]]
        sequences += len(rows)
        padded += len(rows) * max(rows, default=0)
        packed += packed_size([records[i] for i in batch], share_across=share_across)
    return SharingStats(records=len(records), sequences=sequences, micro_batches=len(micro_batches),
                        plain_tokens=plain, packed_tokens=packed, padded_tokens=padded)
