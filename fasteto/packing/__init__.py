"""Padding-free packing: many sequences as one token tree (``layout.PackedBatch``), built by ``tree``,
cut into token-budget micro-batches by ``plan``, measured by ``stats``."""

from fasteto.packing.layout import PackedBatch
from fasteto.packing.plan import packed_size, plan_micro_batches
from fasteto.packing.stats import SharingStats, sharing_stats
from fasteto.packing.tree import pack_pairs, pack_sequences, pack_tree

__all__ = [
    "PackedBatch",
    "SharingStats",
    "pack_pairs",
    "pack_sequences",
    "pack_tree",
    "packed_size",
    "plan_micro_batches",
    "sharing_stats",
]
