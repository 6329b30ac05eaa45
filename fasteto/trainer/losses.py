"""Training losses: SFT cross-entropy here; the pairwise preference losses of ETO's DPO stage live with
the other tensor-only ops in ``fasteto.ops.losses`` (re-exported here)."""

from __future__ import annotations

import torch

from fasteto.ops.losses import (  # noqa: F401  (the trainer's loss names)
    PREFERENCE_LOSSES,
    Metrics,
    chosen_nll_term,
    dpo_sigmoid_loss,
    dpo_sigmoid_norm_loss,
    hinge_loss,
    ipo_loss,
    preference_loss,
)
from fasteto.trainer.logprobs import token_logps


def sft_loss(
    logits_or_logps: torch.Tensor,
    loss_mask: torch.Tensor,
    num_tokens: int | torch.Tensor | None = None,
    input_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Cross-entropy on model tokens only (behavioural cloning, ETO step 1).

    loss = −Σ_{b,t: mask[b,t]} log p(x[b,t] | x[b,<t]) / num_tokens

    Args:
        logits_or_logps: either logits ``[B, T, V]`` (any float dtype; then ``input_ids`` is required)
            or per-token target log-probs ``[B, T]`` float32 as returned by ``logprobs.token_logps``
            (entry ``t`` is the log-prob of token ``t``; column 0 is unused).
        loss_mask: ``[B, T]`` bool, True on model tokens. Position 0 has no prediction and never counts.
        num_tokens: the normaliser. Pass the number of model tokens (positions ≥ 1) of the whole *global*
            batch: each micro-batch then contributes its token sum / global count, and accumulating the
            micro-batch gradients gives exactly the gradient of one big batch's token mean. ``None``
            means this micro-batch's own count (a plain token mean).
        input_ids: ``[B, T]`` long, only with logits.

    Returns:
        0-dim float32 loss. A batch with no model tokens gives NaN when ``num_tokens`` is None.
    """
    if logits_or_logps.dim() == 3:
        if input_ids is None:
            raise ValueError("sft_loss got logits [B, T, V]: pass input_ids [B, T] too")
        logps = token_logps(logits_or_logps, input_ids)
    elif logits_or_logps.dim() == 2:
        logps = logits_or_logps.float()
    else:
        raise ValueError(
            f"sft_loss wants logits [B, T, V] or token log-probs [B, T], got {tuple(logits_or_logps.shape)}"
        )
    mask = loss_mask.clone()
    mask[:, 0] = False
    if num_tokens is None:
        num_tokens = mask.sum()
    return -(logps * mask).sum() / num_tokens
