"""The eager oracle: materialise the logits, ``log_softmax``, gather. Tests and benchmarks compare every
backend against it; it is also the plain "materialised logits" baseline of the benchmark."""

from __future__ import annotations

import torch


def token_logprobs_reference(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    ignore_index: int = -100,
    *,
    upcast: bool = True,
) -> torch.Tensor:
    """``log_softmax((hidden @ weight.T + bias) / temperature)`` at each target, through plain autograd.

    Args:
        hidden: ``[..., D]`` float. weight: ``[V, D]``, hidden's dtype. targets: ``[...]`` long, in
            ``[0, V)`` or ``ignore_index``. bias: ``[V]`` or None.
        upcast: True (the oracle): logits and softmax in float32. False: everything in the inputs' dtype,
            as plain same-dtype PyTorch would do it (the yardstick of the tolerance rule in STYLE.md).

    Returns:
        ``[...]`` float32; 0 (and no gradient) where ``targets == ignore_index``.
    """
    if upcast:
        hidden, weight = hidden.float(), weight.float()
        bias = None if bias is None else bias.float()
    logits = torch.nn.functional.linear(hidden, weight, bias)  # [..., V]
    if temperature != 1.0:
        logits = logits / temperature
    logp_all = torch.log_softmax(logits, dim=-1)
    valid = targets != ignore_index
    picked = logp_all.gather(-1, torch.where(valid, targets, 0).unsqueeze(-1)).squeeze(-1)
    return torch.where(valid, picked, torch.zeros_like(picked)).float()
