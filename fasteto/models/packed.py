"""transformers models on fasteto's packed layout: tree attention inside the model, the fused log-prob op
on its LM head. This is the one module where ``fasteto.ops`` (tensors) meets transformers (models) and
``fasteto.packing`` (layouts).

Tree attention enters a model through transformers' public extension points. :func:`register_tree_attention`
adds one attention function per backend to ``AttentionInterface`` under ``"fasteto_tree_<impl>"`` (adding
names changes no model; :func:`enable_tree_attention` calls it, so nothing registers at import). A model
instance is switched to one of them with its own ``set_attn_implementation`` and switched back afterwards
(:func:`tree_attention_enabled`). The layout reaches every attention call as the ``tree_meta=`` keyword of
the decoder's forward, which Llama, Qwen2 and Mistral pass unchanged from ``model.model(...)`` through
each decoder layer to the attention function (checked for transformers 5.24). Names unknown to
``AttentionMaskInterface`` make ``create_causal_mask`` return None, so the model builds no dense mask.

Scope: decoder-only text models whose attention modules call ``ALL_ATTENTION_FUNCTIONS`` with
``query [1, H, N, D]``, ``key/value [1, Hkv, N, D]``, that take ``position_ids`` for RoPE, and whose logits
are ``h @ W.T + b`` (:func:`lm_head` refuses the others).

A shared token's log-prob counts for every sequence through it (``PackedBatch.sequence_sums``), so
:func:`packed_sequence_logps` equals the plain padded path's sums (``trainer.logprobs.sequence_logps``) in
exact arithmetic.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn
from transformers import AttentionInterface, PreTrainedModel

from fasteto.ops.logprob import fused_token_logprobs
from fasteto.ops.tree_attention import IMPLS, TreeAttentionMeta, tree_attention, tree_attention_meta
from fasteto.packing.layout import PackedBatch

NAME_PREFIX = "fasteto_tree_"
# Config fields that change the logits after the LM head; the fused op computes plain ``h @ W.T + b``.
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "output_multiplier_scale")


def layout_meta(batch: PackedBatch) -> TreeAttentionMeta:
    """The tree attention layout of a packed micro-batch (checked once; reuse it for every layer)."""
    return tree_attention_meta(batch.cu_seqlens, batch.parent, batch.kv_index, batch.cu_seqlens_k)


def attention_name(impl: str) -> str:
    """The ``attn_implementation`` name of backend ``impl``; ``ValueError`` naming the options otherwise."""
    if impl not in IMPLS:
        raise ValueError(f"unknown tree attention impl={impl!r}; choose one of {', '.join(IMPLS)}")
    return NAME_PREFIX + impl


def tree_attention_forward(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                           attention_mask: torch.Tensor | None, dropout: float = 0.0,
                           scaling: float | None = None, *, impl: str,
                           tree_meta: TreeAttentionMeta | None = None, sliding_window: int | None = None,
                           **kwargs) -> tuple[torch.Tensor, None]:
    """An ``AttentionInterface`` function (registered once per ``impl``).

    Args:
        query: ``[1, H, N, D]``. key, value: ``[1, Hkv, N, D]`` (after RoPE). attention_mask: must be None.
        dropout: must be 0 (eval mode, or ``config.attention_dropout == 0``).
        scaling: the module's softmax scale. tree_meta: the layout, from the forward's keyword.
        sliding_window: accepted only where no sequence is longer than the window (then it is a no-op).

    Returns:
        ``([1, N, H, D], None)``: attention output in ``query``'s dtype, no attention weights.
    """
    if tree_meta is None:
        raise ValueError(f"{type(module).__name__} uses attention {attention_name(impl)!r} but the forward "
                         "got no tree_meta=; run it through packed_hidden_states(), or leave "
                         "tree_attention_enabled()")
    if attention_mask is not None:
        raise ValueError("tree attention builds its own mask from tree_meta; pass no attention_mask")
    if query.shape[0] != 1:
        raise ValueError(f"tree attention takes the packed layout as batch 1, got batch {query.shape[0]}")
    if dropout:
        raise NotImplementedError(f"tree attention has no attention dropout (got p={dropout}); set "
                                  "config.attention_dropout = 0 or call model.eval()")
    if sliding_window is not None and tree_meta.max_seqlen_k > sliding_window:
        raise NotImplementedError(f"sliding_window={sliding_window} is shorter than the longest sequence "
                                  f"({tree_meta.max_seqlen_k} tokens); tree attention has no window")
    for name in ("softcap", "s_aux"):
        if kwargs.get(name) is not None:
            raise NotImplementedError(f"tree attention does not support {name!r} "
                                      f"(attention module {type(module).__name__})")
    if torch.is_autocast_enabled(query.device.type):
        # As SDPA under autocast: attention runs in the autocast dtype (RoPE's float32 cos/sin may have
        # promoted query and key while value stayed in the autocast dtype).
        dtype = torch.get_autocast_dtype(query.device.type)
        query, key, value = query.to(dtype), key.to(dtype), value.to(dtype)
    out = tree_attention(query[0].transpose(0, 1), key[0].transpose(0, 1), value[0].transpose(0, 1),
                         tree_meta, impl=impl, scale=scaling)
    return out[None], None


def register_tree_attention() -> None:
    """Register ``"fasteto_tree_<impl>"`` for every impl (idempotent)."""
    for impl in IMPLS:
        attention = functools.partial(tree_attention_forward, impl=impl)
        AttentionInterface.register(attention_name(impl), attention)



def causal_lm(model: nn.Module) -> PreTrainedModel:
    """The transformers model inside ``model``: itself, the one a :class:`PackedLogps` wraps, or the base
    model of a peft wrapper."""
    if isinstance(model, PackedLogps):
        model = model.model
    if isinstance(model, PreTrainedModel):
        return model
    get_base = getattr(model, "get_base_model", None)  # peft
    base = get_base() if callable(get_base) else None
    if isinstance(base, PreTrainedModel):
        return base
    raise TypeError("expected a transformers PreTrainedModel or a peft wrapper of one, "
                    f"got {type(model).__name__}")


def _implementations(model: PreTrainedModel) -> set[str]:
    return {m.config._attn_implementation for m in model.modules() if isinstance(m, PreTrainedModel)}


def enable_tree_attention(model: nn.Module, impl: str = "auto") -> str:
    """Switch ``model`` (this instance, i.e. its config object) to tree attention backend ``impl``.

    Returns the previous ``attn_implementation``, to give to :func:`restore_attention`.
    """
    name = attention_name(impl)
    register_tree_attention()
    target = causal_lm(model)
    previous = _implementations(target)
    if len(previous) != 1:
        raise ValueError(f"{type(target).__name__} mixes attention implementations {sorted(previous)}; "
                         "tree attention switches single-implementation decoder models only")
    target.set_attn_implementation(name)
    if _implementations(target) != {name}:
        target.set_attn_implementation(next(iter(previous)))
        raise ValueError(f"{type(target).__name__} did not take attn_implementation={name!r}: its attention "
                         "does not dispatch through transformers' AttentionInterface")
    return previous.pop()


def restore_attention(model: nn.Module, previous: str) -> None:
    """Undo :func:`enable_tree_attention`: set ``model``'s ``attn_implementation`` back to ``previous``."""
    causal_lm(model).set_attn_implementation(previous)


@contextmanager
def tree_attention_enabled(model: nn.Module, impl: str = "auto") -> Iterator[nn.Module]:
    """``with tree_attention_enabled(model, "flex"): ...``: tree attention inside, the previous
    implementation restored on exit (also on error)."""
    previous = enable_tree_attention(model, impl)
    try:
        yield model
    finally:
        restore_attention(model, previous)


def packed_hidden_states(model: nn.Module, batch: PackedBatch, impl: str = "auto",
                         meta: TreeAttentionMeta | None = None) -> torch.Tensor:
    """Final hidden states (after the decoder's final norm) of the packed layout; no LM head.

    Args:
        model: a transformers causal LM (or its decoder), possibly peft-wrapped (LoRA layers live inside
            the decoder's modules, so they take part).
        batch: the layout, on the model's device. impl: tree attention backend.
        meta: ``layout_meta(batch)`` when the caller already made it (else it is made here).

    Returns:
        ``[N, hidden_size]`` in the model's dtype, differentiable in the model's trainable parameters.

    With activation checkpointing, backward re-runs the layers, so the model must still use tree attention
    then: wrap forward and backward in :func:`tree_attention_enabled` (this function raises otherwise).
    """
    meta = layout_meta(batch) if meta is None else meta
    target = causal_lm(model)
    decoder = target.get_decoder()
    checkpointing = any(getattr(m, "gradient_checkpointing", False) for m in decoder.modules())
    if checkpointing and target.training and torch.is_grad_enabled() and \
            _implementations(target) != {attention_name(impl)}:
        raise RuntimeError("activation checkpointing re-runs attention during backward, after this call "
                           "would have restored the model's attention; wrap forward and backward in "
                           f"`with tree_attention_enabled(model, {impl!r}):`")
    with tree_attention_enabled(model, impl):
        out = decoder(input_ids=batch.input_ids[None], position_ids=batch.position_ids[None],
                      use_cache=False, tree_meta=meta)
    return out.last_hidden_state[0]


def lm_head(model: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The LM head's ``weight`` ``[V, D]`` and ``bias`` ``[V]`` (or None) of a causal LM, tied to the input
    embedding or not, possibly peft-wrapped. Raises when the model's logits are not ``h @ W.T + b``."""
    base = causal_lm(model)
    head = base.get_output_embeddings()
    name = type(base).__name__
    if head is None:
        raise ValueError(f"{name} has no output embeddings (get_output_embeddings() is None); the fast "
                         "trainer needs a causal LM with an LM head (use trainer='plain')")
    if hasattr(head, "base_layer") or not isinstance(head, nn.Linear):
        raise NotImplementedError(
            f"{name}'s LM head is a {type(head).__name__}, not a plain nn.Linear (an adapter on lm_head?); "
            "the fused log-prob op reads its weight directly. Leave lm_head out of the LoRA target modules "
            "or use trainer='plain'")
    for field in _LOGIT_TRANSFORMS:
        if getattr(base.config, field, None) not in (None, 1, 1.0):
            raise NotImplementedError(f"{name} applies config.{field}={getattr(base.config, field)!r} to its "
                                      "logits, which the fast trainer does not; use trainer='plain'")
    return head.weight, head.bias


def packed_sequence_logps(model: nn.Module, batch: PackedBatch, *, attn_impl: str = "auto",
                          logprob_impl: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probs of the model tokens of every sequence of a packed micro-batch.

    Args:
        model: a transformers causal LM (Llama, Qwen2, Mistral, ...), possibly peft-wrapped.
        batch: the layout (``pack_pairs`` / ``pack_sequences``), on the model's device.
        attn_impl: tree attention backend (``fasteto.ops.tree_attention.IMPLS``).
        logprob_impl: fused log-prob backend (``fasteto.ops.logprob.api.IMPLS``).

    Returns:
        ``sum_logps`` ``[Q]`` float32 (differentiable in the model's trainable parameters) and
        ``n_tokens`` ``[Q]`` long, the model tokens counted in each sum.
    """
    hidden = packed_hidden_states(model, batch, impl=attn_impl)
    weight, bias = lm_head(model)
    logps = fused_token_logprobs(hidden[batch.logp_rows], weight, batch.logp_targets, bias, impl=logprob_impl)
    return batch.sequence_sums(logps), batch.sequence_token_counts()


class PackedLogps(nn.Module):
    """``packed_sequence_logps`` as a module's ``forward``, so that it can be the root unit of FSDP2
    (whose hooks gather the embedding, final norm and LM head only around a module's forward; see
    ``fasteto.trainer.distributed``). Outside FSDP it is a thin wrapper: ``train_sft`` / ``train_dpo``
    build one around a plain model."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, batch: PackedBatch, attn_impl: str = "auto",
                logprob_impl: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
        """As :func:`packed_sequence_logps` on the wrapped model."""
        return packed_sequence_logps(self.model, batch, attn_impl=attn_impl, logprob_impl=logprob_impl)
