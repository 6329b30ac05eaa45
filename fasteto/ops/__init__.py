"""fasteto's fused ops, for any DPO code: they take tensors and layout metadata, never models, files or
environments, and import neither transformers nor the rest of fasteto.

- :func:`fused_token_logprobs` ``(hidden [..., D], weight [V, D], targets [...]) -> [...]`` float32:
  per-token log-probs from hidden states and the LM head weight, forward and backward, without the
  ``[tokens, V]`` logits.
- :func:`tree_attention_meta` ``(cu_seqlens, parent, kv_index, cu_seqlens_k)`` and :func:`tree_attention`
  ``(q [N, H, D], k, v [N, Hkv, D], meta) -> [N, H, D]``: attention over a packed shared-prefix token
  tree (each shared prompt computed once for all the sequences through it).
- :func:`decode_attention` ``(query [R, H_kv, G, D], keys, values [S, H_kv, C, D], slots [R],
  lengths [R], scale) -> [R, H_kv, G, D]``: one new token per row attending to its KV slot's first
  positions (the continuous engine's decoding rows), each slot position read once per kv head.
- :func:`preference_loss` and the losses it names (:data:`PREFERENCE_LOSSES`): DPO and its variants on
  summed per-sequence log-probs.

Layout: one folder per op, ``<op>/api.py`` (public function, validation, ``impl=``), ``reference.py``
(eager CPU oracle), then one file per optimised backend; backends never import each other. Every op
takes ``impl=``: an explicit backend that cannot run raises with the reason; ``"auto"`` records and logs
its choice (``fasteto.utils.choices``).
"""

from fasteto.ops.decode_attention import decode_attention
from fasteto.ops.logprob import fused_token_logprobs
from fasteto.ops.losses import (
    PREFERENCE_LOSSES,
    chosen_nll_term,
    dpo_sigmoid_loss,
    dpo_sigmoid_norm_loss,
    hinge_loss,
    ipo_loss,
    preference_loss,
)
from fasteto.ops.tree_attention import TreeAttentionMeta, tree_attention, tree_attention_meta

__all__ = [
    "PREFERENCE_LOSSES",
    "TreeAttentionMeta",
    "chosen_nll_term",
    "decode_attention",
    "dpo_sigmoid_loss",
    "dpo_sigmoid_norm_loss",
    "fused_token_logprobs",
    "hinge_loss",
    "ipo_loss",
    "preference_loss",
    "tree_attention",
    "tree_attention_meta",
]
