"""Per-sequence log-probs on the packed layout: one padding-free token tree per micro-batch
(``fasteto.packing``), tree attention inside the model (``fasteto.ops.tree_attention``) and the fused
log-prob op on the LM head (``fasteto.ops.logprob``), so neither padding nor ``[tokens, vocab]`` logits
are ever materialised and a prefix shared by several sequences is computed once.

A shared token's log-prob counts for every sequence through it (``PackedBatch.sequence_sums``), so the
sums equal the plain padded path's (``logprobs.sequence_logps``) in exact arithmetic.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from transformers import PreTrainedModel

from fasteto.data.tokenized import TokenizedPair
from fasteto.ops.logprob import fused_token_logprobs
from fasteto.ops.tree_attention.hf import packed_hidden_states
from fasteto.packing import PackedBatch, pack_pairs, plan_micro_batches
from fasteto.trainer.logprobs import autocast_context, model_device

# Config fields that change the logits after the LM head; the fused op computes plain ``h @ W.T + b``.
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "output_multiplier_scale")


def causal_lm(model: nn.Module) -> nn.Module:
    """The transformers causal LM inside ``model``: itself, the one a :class:`PackedLogps` wraps, or the
    base model of a peft wrapper."""
    if isinstance(model, PackedLogps):
        model = model.model
    if isinstance(model, PreTrainedModel):
        return model
    get_base = getattr(model, "get_base_model", None)  # peft
    base = get_base() if callable(get_base) else None
    if isinstance(base, PreTrainedModel):
        return base
    raise TypeError(f"expected a transformers causal LM or a peft wrapper of one, got {type(model).__name__}")


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


@torch.no_grad()
def reference_logps_packed(
    model: nn.Module,
    pairs: Sequence[TokenizedPair],
    token_budget: int,
    bf16: bool | str = "auto",
    *,
    attn_impl: str = "auto",
    logprob_impl: str = "auto",
) -> dict[int, tuple[float, float]]:
    """``logprobs.reference_logps`` on the packed layout: pairs are cut into micro-batches of at most
    ``token_budget`` packed tokens (``plan_micro_batches``; sharing across pairs), each run once in eval
    mode without gradients.

    Returns:
        ``{pair index in pairs: (chosen_logp, rejected_logp)}`` as Python floats (float32 values).
    """
    runner = model if isinstance(model, PackedLogps) else PackedLogps(model)
    was_training = runner.training
    runner.eval()
    device = model_device(runner)
    out: dict[int, tuple[float, float]] = {}
    try:
        for chunk in plan_micro_batches(pairs, token_budget):
            batch, chosen, rejected = pack_pairs([pairs[i] for i in chunk])
            with autocast_context(device, bf16):
                sums, _ = runner(batch.to(device), attn_impl, logprob_impl)
            sums = sums.float().cpu()
            for j, i in enumerate(chunk):
                out[i] = (float(sums[chosen[j]]), float(sums[rejected[j]]))
    finally:
        runner.train(was_training)
    return out
