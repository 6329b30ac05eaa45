"""Chunked log-probs in plain PyTorch (the CPU backend).

Rows are processed ``chunk_size`` at a time: a chunk's logits ``[chunk, V]`` are computed in float32,
reduced to a log-sum-exp and the target logit, and dropped. Backward recomputes each chunk's logits
from the saved per-row LSE, so the peak extra memory of either pass is one ``[chunk, V]`` float32 block
(plus, for half-precision weights, a float32 ``[V, D]`` accumulator for ``grad_weight``: summing many
per-chunk bf16 partials would lose precision).

The GEMMs run in the inputs' dtype (they accumulate in float32 internally on CPU and CUDA); the chunk's
logits are then upcast, so for bf16/fp16 the logits carry the same rounding as plain same-dtype PyTorch.
The autograd wiring lives in ``api.py`` (``torch.library.register_autograd``), which calls ``forward``
and ``backward`` here.
"""

from __future__ import annotations

import torch

# One float32 [chunk, V] block of about 32 MiB.
_CHUNK_ELEMENTS = 1 << 23


def default_chunk_size(vocab_size: int) -> int:
    """Rows per chunk when the caller gives none: one float32 ``[chunk, V]`` block of about 32 MiB."""
    return max(1, _CHUNK_ELEMENTS // max(1, vocab_size))


def _chunk_logits(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, temperature: float
) -> torch.Tensor:
    """``[c, D] x [V, D] (+ [V]) -> [c, V]`` float32, already divided by the temperature."""
    logits = (hidden @ weight.T).float()
    if bias is not None:
        logits += bias.float()
    if temperature != 1.0:
        logits /= temperature
    return logits


def forward(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None,
    temperature: float,
    ignore_index: int,
    chunk_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Target log-probs and per-row log-sum-exp.

    Args:
        hidden: ``[M, D]`` float. weight: ``[V, D]``, hidden's dtype. targets: ``[M]`` long, in ``[0, V)``
            or ``ignore_index``. bias: ``[V]`` or None. chunk_size: rows per chunk (None: about 32 MiB).

    Returns:
        ``logp`` ``[M]`` float32 (0 where ignored) and ``lse`` ``[M]`` float32 (of the scaled logits).
    """
    rows = hidden.shape[0]
    chunk = chunk_size or default_chunk_size(weight.shape[0])
    logp = torch.zeros(rows, dtype=torch.float32, device=hidden.device)
    lse = torch.empty(rows, dtype=torch.float32, device=hidden.device)
    for start in range(0, rows, chunk):
        end = min(start + chunk, rows)
        logits = _chunk_logits(hidden[start:end], weight, bias, temperature)
        tgt = targets[start:end]
        valid = tgt != ignore_index
        picked = logits.gather(1, torch.where(valid, tgt, 0).unsqueeze(1)).squeeze(1)
        # log-sum-exp in place (torch.logsumexp would allocate a second [chunk, V] block)
        row_max = logits.amax(dim=1)
        row_lse = logits.sub_(row_max.unsqueeze(1)).exp_().sum(dim=1).log_().add_(row_max)
        lse[start:end] = row_lse
        logp[start:end] = torch.where(valid, picked - row_lse, 0.0)
        del logits  # before the next chunk's block is allocated
    return logp, lse


def backward(
    grad_logp: torch.Tensor,
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None,
    lse: torch.Tensor,
    temperature: float,
    ignore_index: int,
    chunk_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Gradients of ``sum(grad_logp * logp)``.

    With ``z = (h W^T + b) / T`` and ``p = softmax(z)``: ``d logp / d(h W^T + b) = (onehot(target) - p) / T``.

    Args:
        grad_logp: ``[M]`` float32. lse: ``[M]`` float32 from ``forward``. Others as in ``forward``.

    Returns:
        ``grad_hidden`` ``[M, D]`` and ``grad_weight`` ``[V, D]`` in their inputs' dtypes, ``grad_bias``
        ``[V]`` (None without bias).
    """
    rows = hidden.shape[0]
    chunk = chunk_size or default_chunk_size(weight.shape[0])
    grad_hidden = torch.empty_like(hidden)
    # For float32 weights the accumulator is the gradient itself.
    grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
    grad_bias = None if bias is None else torch.zeros(bias.shape, dtype=torch.float32, device=bias.device)
    for start in range(0, rows, chunk):
        end = min(start + chunk, rows)
        h = hidden[start:end]
        tgt = targets[start:end]
        valid = tgt != ignore_index
        scale = torch.where(valid, grad_logp[start:end].float(), 0.0) / temperature  # [c]
        dlogits = _chunk_logits(h, weight, bias, temperature)
        dlogits.sub_(lse[start:end].unsqueeze(1)).exp_().mul_(-scale.unsqueeze(1))  # -scale * p
        dlogits.scatter_add_(1, torch.where(valid, tgt, 0).unsqueeze(1), scale.unsqueeze(1))
        grad_hidden[start:end] = dlogits.to(weight.dtype) @ weight
        grad_weight.addmm_(dlogits.T, h.float())
        if grad_bias is not None:
            grad_bias += dlogits.sum(0)
        del dlogits  # before the next chunk's block is allocated
    grad_bias = None if grad_bias is None else grad_bias.to(bias.dtype)
    return grad_hidden, grad_weight.to(weight.dtype), grad_bias
