"""Eager tree attention on any device: dense SDPA with an explicit ``[N, N]`` boolean mask.

This is the oracle the other backends are tested against, so it favours obviousness over speed: the
ancestor relation is found by walking parent pointers in Python, and the mask is materialised in full
(``O(N^2)`` memory).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def tree_mask(segment_ids: torch.Tensor, parent: torch.Tensor) -> torch.Tensor:
    """The tree attention rule as a dense mask.

    Args:
        segment_ids: ``[N]`` int, each token's segment (segments contiguous, in layout order).
        parent: ``[S]`` long, each segment's parent, ``-1`` for a root; ``parent[s] < s``.

    Returns:
        ``[N, N]`` bool on ``segment_ids``' device: ``mask[i, j]`` is True iff ``seg(j)`` is a strict
        ancestor of ``seg(i)``, or ``seg(j) == seg(i)`` and ``j <= i``.
    """
    parents = parent.tolist()
    num_segments = len(parents)
    ancestor = torch.zeros(num_segments, num_segments, dtype=torch.bool)
    for s in range(num_segments):
        a = parents[s]
        while a >= 0:
            ancestor[s, a] = True
            a = parents[a]
    seg = segment_ids.long().cpu()
    positions = torch.arange(seg.numel())
    same_segment = seg[:, None] == seg[None, :]
    causal = positions[:, None] >= positions[None, :]
    mask = ancestor[seg[:, None], seg[None, :]] | (same_segment & causal)
    return mask.to(segment_ids.device)


def reference_tree_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                             scale: float) -> torch.Tensor:
    """Masked attention over the whole layout at once.

    Args:
        q: ``[N, H, D]``. k, v: ``[N, Hkv, D]`` with ``H % Hkv == 0`` (query head ``h`` reads KV head
        ``h // (H // Hkv)``). All one dtype (any float, float64 included) and device.
        mask: ``[N, N]`` bool from :func:`tree_mask`.
        scale: softmax scale applied to ``q @ k^T``.

    Returns:
        ``[N, H, D]`` in ``q``'s dtype.
    """
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
        attn_mask=mask, scale=scale, enable_gqa=q.shape[1] != k.shape[1])
    return out[0].transpose(0, 1)
