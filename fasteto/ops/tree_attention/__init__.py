"""Attention over a packed token tree, from raw layout tensors, with explicit backends. The transformers
integration is ``fasteto.models.packed``."""

from fasteto.ops.tree_attention.api import IMPLS, TreeAttentionMeta, tree_attention, tree_attention_meta

__all__ = ["IMPLS", "TreeAttentionMeta", "tree_attention", "tree_attention_meta"]
