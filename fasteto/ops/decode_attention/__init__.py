"""Decode attention over per-row KV slots: one new token per row, its query heads grouped by kv head.
``api.decode_attention`` is the entry point; ``reference.py`` is the oracle."""

from fasteto.ops.decode_attention.api import DECODE_ATTENTION_IMPLS, decode_attention

__all__ = ["DECODE_ATTENTION_IMPLS", "decode_attention"]
