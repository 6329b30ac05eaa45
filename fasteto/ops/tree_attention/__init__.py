"""Attention over a packed token tree (:class:`fasteto.packing.layout.PackedBatch`), with explicit
backends; ``hf`` plugs it into transformers models (import it explicitly: it needs transformers)."""

from fasteto.ops.tree_attention.api import IMPLS, TreeAttentionMeta, tree_attention, tree_attention_meta

__all__ = ["IMPLS", "TreeAttentionMeta", "tree_attention", "tree_attention_meta"]
