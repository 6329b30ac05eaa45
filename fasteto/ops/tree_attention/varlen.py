"""Tree attention with a FlashAttention varlen kernel over the gathered-KV view.

Segment ``s`` is one varlen "sequence": its queries are its own tokens ``q[cu_seqlens[s]:cu_seqlens[s+1]]``
and its keys/values are ``k[kv_index[cu_seqlens_k[s]:cu_seqlens_k[s+1]]]`` (ancestors' tokens root first,
then its own). With the causal mask aligned bottom-right (query row ``r`` of ``Lq`` sees key columns
``c <= r + Lk - Lq``), every ancestor token is visible and the own tokens are causal: the tree rule.

Kernels: ``flash_attn.flash_attn_varlen_func`` where the flash-attn package is installed (causal is
bottom-right since flash-attn 2.1), else ``torch.nn.attention.varlen.varlen_attn`` (torch >= 2.9), which
calls ATen's vendored FlashAttention-2 with ``window_size=(-1, 0)``; its mask limit is
``row + 1 + seqlen_k - seqlen_q + window_right``, i.e. bottom-right too. Both need CUDA (sm80+) and
fp16/bf16.

:func:`gathered_kv_attention_eager` computes exactly the same thing segment by segment with SDPA, on any
device and dtype, so the ``kv_index``/``cu_seqlens_k`` logic is testable on CPU.
"""

from __future__ import annotations

import functools
import importlib.util
from collections.abc import Callable

import torch
import torch.nn.functional as F

KERNEL_DTYPES = (torch.float16, torch.bfloat16)


@functools.cache
def _kernel() -> tuple[str, Callable] | None:
    """The varlen kernel this process can use: ``(name, function)``, or None."""
    if importlib.util.find_spec("flash_attn") is not None:
        from flash_attn import flash_attn_varlen_func

        return "flash_attn.flash_attn_varlen_func", flash_attn_varlen_func
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return "torch.nn.attention.varlen.varlen_attn", varlen_attn


def kernel_name() -> str | None:
    """Which varlen kernel :func:`varlen_tree_attention` calls, or None when none is importable."""
    found = _kernel()
    return found[0] if found else None


def varlen_unavailable_reason(q: torch.Tensor, k: torch.Tensor) -> str | None:
    """Why the varlen kernel cannot run on these inputs (``q``: ``[N, H, D]``, ``k``: ``[N, Hkv, D]``),
    or None when it can."""
    if _kernel() is None:
        return ("no varlen kernel: install flash-attn (`pip install fasteto[gpu]`) or torch >= 2.9, "
                "which has torch.nn.attention.varlen")
    if q.device.type != "cuda":
        return f"the FlashAttention varlen kernels need CUDA tensors, got {q.device.type}"
    if q.dtype not in KERNEL_DTYPES:
        return f"the FlashAttention varlen kernels take float16/bfloat16, got {q.dtype}"
    if torch.cuda.get_device_capability(q.device) < (8, 0):
        name = torch.cuda.get_device_name(q.device)
        return f"FlashAttention-2 needs compute capability >= 8.0, {name} has less"
    if q.shape[-1] > 256 or q.shape[-1] % 8 or k.shape[-1] != q.shape[-1]:
        return f"FlashAttention-2 takes head dims that are multiples of 8 up to 256, got {q.shape[-1]}"
    return None


def varlen_tree_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_index: torch.Tensor,
                          cu_seqlens: torch.Tensor, cu_seqlens_k: torch.Tensor, max_seqlen: int,
                          max_seqlen_k: int, scale: float) -> torch.Tensor:
    """Varlen FlashAttention over the gathered-KV view (call only when
    :func:`varlen_unavailable_reason` is None).

    Args:
        q: ``[N, H, D]`` fp16/bf16 CUDA. k, v: ``[N, Hkv, D]``, ``H % Hkv == 0``.
        kv_index: ``[Nk]`` long, token indices of each segment's keys. cu_seqlens: ``[S + 1]`` int32,
        segment boundaries in the layout. cu_seqlens_k: ``[S + 1]`` int32, boundaries in ``kv_index``.
        max_seqlen, max_seqlen_k: the longest segment and the longest key list.
        scale: softmax scale.

    Returns:
        ``[N, H, D]`` in ``q``'s dtype. Differentiable in ``q, k, v`` (the gather's backward sums the
        key gradients of a shared token over every segment that reads it).
    """
    name, kernel = _kernel()
    q = q.contiguous()
    k_gathered = k.index_select(0, kv_index)
    v_gathered = v.index_select(0, kv_index)
    if name.startswith("flash_attn"):
        return kernel(q, k_gathered, v_gathered, cu_seqlens, cu_seqlens_k, max_seqlen, max_seqlen_k,
                      dropout_p=0.0, softmax_scale=scale, causal=True)
    # varlen_attn reads causal from `window_size == (-1, 0)`: it must be this tuple, not a list.
    return kernel(q, k_gathered, v_gathered, cu_seqlens, cu_seqlens_k, max_seqlen, max_seqlen_k,
                  scale=scale, window_size=(-1, 0), enable_gqa=q.shape[1] != k.shape[1])


def gathered_kv_attention_eager(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_index: torch.Tensor,
                                cu_seqlens: torch.Tensor, cu_seqlens_k: torch.Tensor,
                                scale: float) -> torch.Tensor:
    """What :func:`varlen_tree_attention` computes, one segment at a time with SDPA (any device/dtype).

    Args: as :func:`varlen_tree_attention` (without the max lengths).

    Returns:
        ``[N, H, D]`` in ``q``'s dtype, differentiable.
    """
    bounds_q, bounds_k = cu_seqlens.tolist(), cu_seqlens_k.tolist()
    outs = []
    for s in range(len(bounds_q) - 1):
        q_s = q[bounds_q[s]:bounds_q[s + 1]]
        keys = kv_index[bounds_k[s]:bounds_k[s + 1]]
        len_q, len_k = q_s.shape[0], keys.numel()
        rows = torch.arange(len_q, device=q.device)[:, None]
        cols = torch.arange(len_k, device=q.device)[None, :]
        bottom_right_causal = cols <= rows + (len_k - len_q)
        out = F.scaled_dot_product_attention(
            q_s.transpose(0, 1)[None], k[keys].transpose(0, 1)[None], v[keys].transpose(0, 1)[None],
            attn_mask=bottom_right_causal, scale=scale, enable_gqa=q.shape[1] != k.shape[1])
        outs.append(out[0].transpose(0, 1))
    return torch.cat(outs)
