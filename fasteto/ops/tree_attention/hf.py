"""Tree attention inside transformers models, through transformers' public extension points.

Importing this module registers one attention function per backend in ``AttentionInterface`` under
``"fasteto_tree_<impl>"`` (adding names changes no model). A model instance is switched to one of them
with its own ``set_attn_implementation`` and switched back afterwards (:func:`tree_attention_enabled`).
The layout reaches every attention call as the ``tree_meta=`` keyword of the decoder's forward, which
Llama, Qwen2 and Mistral pass unchanged from ``model.model(...)`` through each decoder layer to the
attention function (checked for transformers 5.24). Names unknown to ``AttentionMaskInterface`` make
``create_causal_mask`` return None, so the model builds no dense mask.

Scope: decoder-only text models whose attention modules call ``ALL_ATTENTION_FUNCTIONS`` with
``query [1, H, N, D]``, ``key/value [1, Hkv, N, D]``, and that take ``position_ids`` for RoPE.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn
from transformers import AttentionInterface, PreTrainedModel

from fasteto.ops.tree_attention.api import IMPLS, TreeAttentionMeta, tree_attention, tree_attention_meta
from fasteto.packing.layout import PackedBatch

NAME_PREFIX = "fasteto_tree_"


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
    if sliding_window is not None and tree_meta.max_position >= sliding_window:
        raise NotImplementedError(f"sliding_window={sliding_window} is shorter than the longest sequence "
                                  f"({tree_meta.max_position + 1} tokens); tree attention has no window")
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


register_tree_attention()


def _transformers_model(model: nn.Module) -> PreTrainedModel:
    """The transformers model inside ``model`` (itself, or a peft wrapper's base model)."""
    if isinstance(model, PreTrainedModel):
        return model
    get_base = getattr(model, "get_base_model", None)
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
    target = _transformers_model(model)
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
    _transformers_model(model).set_attn_implementation(previous)


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
        meta: ``tree_attention_meta(batch)`` when the caller already made it (else it is made here).

    Returns:
        ``[N, hidden_size]`` in the model's dtype, differentiable in the model's trainable parameters.

    With activation checkpointing, backward re-runs the layers, so the model must still use tree attention
    then: wrap forward and backward in :func:`tree_attention_enabled` (this function raises otherwise).
    """
    meta = tree_attention_meta(batch) if meta is None else meta
    target = _transformers_model(model)
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
