"""Tree attention with FlexAttention: the tree rule as a ``mask_mod`` over segment ids.

The ``BlockMask`` is built once per micro-batch (it depends only on the tree) and reused by every layer.
Blocks where no query token sees any key are skipped by the kernel, so disjoint branches cost nothing.

CPU (torch 2.13): the forward runs, eagerly or compiled (inductor's C++ compile took ~30 s for one
shape on this project's 2-core CI box); FlexAttention has no backward on CPU, so training uses it on
CUDA only.
"""

from __future__ import annotations

import functools

import torch
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention


def ancestor_table(parent: torch.Tensor) -> torch.Tensor:
    """Strict-ancestor relation of the segments, plus one sentinel segment related to nothing.

    Binary lifting on the device (no host sync): after step ``t``, ``reach[s]`` holds the ancestors of
    ``s`` at distance ``<= 2**t`` and ``jump[s]`` is its ``2**t``-th ancestor (the sentinel past a root).

    Args:
        parent: ``[S]`` long, ``-1`` for a root.

    Returns:
        ``[S + 1, S + 1]`` bool: ``table[s, a]`` iff ``a`` is a strict ancestor of ``s``; row and column
        ``S`` (the sentinel used for padding) are all False.
    """
    num_segments = parent.numel()
    sentinel = parent.new_tensor([num_segments])
    jump = torch.cat([torch.where(parent < 0, num_segments, parent), sentinel])
    reach = torch.zeros(num_segments + 1, num_segments + 1, dtype=torch.bool, device=parent.device)
    reach[torch.arange(num_segments + 1, device=parent.device), jump] = True
    reach[:, num_segments] = False
    for _ in range(max(1, num_segments.bit_length())):  # 2**steps >= S > any depth
        reach = reach | reach[jump]
        jump = jump[jump]
    return reach


def build_block_mask(segment_ids: torch.Tensor, parent: torch.Tensor, compiled: bool = False) -> BlockMask:
    """The tree rule as a FlexAttention ``BlockMask`` (one head, one batch: broadcast to all).

    Args:
        segment_ids: ``[N]`` int, each token's segment. parent: ``[S]`` long, ``-1`` for a root.
        compiled: build it with ``torch.compile(create_block_mask)``; eager evaluation materialises
            ``[N, N]`` intermediates (int64 segment lookups: 2 GB each at N = 16k).

    Returns:
        ``BlockMask`` of shape ``(1, 1, N, N)`` on ``segment_ids``' device. The kernel evaluates the
        mask in whole blocks, so the segment table is padded with the sentinel segment to a block
        multiple: padded indices stay in bounds and see nothing.
    """
    num_tokens, num_segments = segment_ids.numel(), parent.numel()
    block = 128  # FlexAttention's default sparse block size
    padded = -(-num_tokens // block) * block
    seg = torch.full((padded,), num_segments, dtype=torch.long, device=segment_ids.device)
    seg[:num_tokens] = segment_ids.long()
    ancestor = ancestor_table(parent.long())

    def tree_rule(b, h, q_idx, kv_idx):
        seg_q, seg_kv = seg[q_idx], seg[kv_idx]
        return ancestor[seg_q, seg_kv] | ((seg_q == seg_kv) & (kv_idx <= q_idx))

    create = _compiled(create_block_mask) if compiled else create_block_mask
    return create(tree_rule, B=None, H=None, Q_LEN=num_tokens, KV_LEN=num_tokens,
                  device=segment_ids.device, BLOCK_SIZE=block)


@functools.cache
def _compiled(function):
    # One compiled callable per function and process: compiling per call would recompile every time.
    return torch.compile(function)


def flex_tree_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask: BlockMask,
                        scale: float, compiled: bool) -> torch.Tensor:
    """FlexAttention over the layout.

    Args:
        q: ``[N, H, D]``. k, v: ``[N, Hkv, D]``, ``H % Hkv == 0``. One float dtype and device.
        block_mask: from :func:`build_block_mask` for this layout, on the same device.
        scale: softmax scale. compiled: run ``torch.compile(flex_attention)`` (the fused kernel)
            instead of the eager version, which materialises the scores.

    Returns:
        ``[N, H, D]`` in ``q``'s dtype.
    """
    attend = _compiled(flex_attention) if compiled else flex_attention
    out = attend(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
                 block_mask=block_mask, scale=scale, enable_gqa=q.shape[1] != k.shape[1])
    return out[0].transpose(0, 1)
