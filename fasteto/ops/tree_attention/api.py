"""Public tree attention: one function, explicit backends.

The layout is a :class:`~fasteto.packing.layout.PackedBatch` token tree. Token ``i`` attends to token
``j`` iff ``j`` is in a strict ancestor segment of ``seg(i)``, or in the same segment with ``j <= i``.

Backends (``impl=``):

- ``"reference"``: dense SDPA with an explicit ``[N, N]`` mask; any device, any float dtype; the oracle.
- ``"flex"``: FlexAttention with a ``BlockMask`` built from the tree (compiled on CUDA; eager on CPU,
  forward only: FlexAttention has no CPU backward).
- ``"varlen"``: FlashAttention varlen over the gathered-KV view (CUDA, fp16/bf16).
- ``"varlen_eager"``: the same gathered-KV computation segment by segment with SDPA; any device. It
  tests the ``kv_index``/``cu_seqlens_k`` layout without a GPU, and is the CPU training backend.
- ``"auto"``: ``varlen`` when it can run, else ``flex`` on CUDA; ``varlen_eager`` elsewhere (per-segment
  SDPA over gathered keys: no dense ``[N, N]`` mask, so it costs what the sequences cost, not ``N²``).
  Logged once.

An explicit ``impl`` that cannot run raises ``ValueError`` with the reason; nothing falls back silently.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass, field
from typing import Any

import torch

from fasteto.ops.tree_attention import flex, reference, varlen
from fasteto.packing.layout import PackedBatch

log = logging.getLogger(__name__)

IMPLS = ("auto", "reference", "flex", "varlen", "varlen_eager")


@dataclass
class TreeAttentionMeta:
    """What the backends need from a :class:`PackedBatch`, plus per-backend structures built on first use
    (the dense mask, the ``BlockMask``) and reused by every layer of the forward.

    segment_ids: ``[N]`` int32. cu_seqlens: ``[S + 1]`` int32. parent: ``[S]`` long.
    kv_index: ``[Nk]`` long. cu_seqlens_k: ``[S + 1]`` int32. max_seqlen, max_seqlen_k: ints.
    max_position: the largest position id (a model's sliding window is a no-op when it exceeds it).
    """

    segment_ids: torch.Tensor
    cu_seqlens: torch.Tensor
    parent: torch.Tensor
    kv_index: torch.Tensor
    cu_seqlens_k: torch.Tensor
    max_seqlen: int
    max_seqlen_k: int
    max_position: int
    prepared: dict[tuple[str, str], Any] = field(default_factory=dict, repr=False)

    @property
    def num_tokens(self) -> int:
        return int(self.segment_ids.numel())

    @property
    def device(self) -> torch.device:
        return self.segment_ids.device


def tree_attention_meta(batch: PackedBatch) -> TreeAttentionMeta:
    """Check the tree structure of ``batch`` once and keep what attention needs.

    Raises ``ValueError`` naming the inconsistent field (the packer's output is wrong, not the call).
    """
    _check_tree(batch)
    return TreeAttentionMeta(
        segment_ids=batch.segment_ids, cu_seqlens=batch.cu_seqlens.to(torch.int32),
        parent=batch.parent.long(), kv_index=batch.kv_index.long(),
        cu_seqlens_k=batch.cu_seqlens_k.to(torch.int32),
        max_seqlen=int(batch.max_seqlen), max_seqlen_k=int(batch.max_seqlen_k),
        max_position=int(batch.position_ids.max()) if batch.num_tokens else 0)


def _check_tree(batch: PackedBatch) -> None:
    """Structural checks on the tree fields (one host sync per micro-batch)."""
    n, s = batch.num_tokens, batch.num_segments
    bounds, parents, bounds_k = batch.cu_seqlens.tolist(), batch.parent.tolist(), batch.cu_seqlens_k.tolist()
    lengths = [bounds[i + 1] - bounds[i] for i in range(len(bounds) - 1)]
    if n == 0 or len(bounds) != s + 1 or bounds[0] != 0 or bounds[-1] != n or min(lengths) < 1:
        _bad_tree(f"cu_seqlens must rise strictly from 0 to N={n} (N > 0) in S={s} steps, got {bounds[:8]}")
    if not torch.equal(batch.segment_ids.long().cpu(), torch.repeat_interleave(torch.tensor(lengths))):
        _bad_tree("segment_ids must number the tokens of cu_seqlens' segments 0, 1, ...")
    if any(not -1 <= p < i for i, p in enumerate(parents)):
        _bad_tree(f"parent[s] must be -1 or < s (segments in depth-first order), got {parents[:8]}")
    kv_lengths: list[int] = []
    for i, p in enumerate(parents):
        kv_lengths.append(lengths[i] + (kv_lengths[p] if p >= 0 else 0))
    if len(bounds_k) != s + 1 or bounds_k[0] != 0 or \
            [bounds_k[i + 1] - bounds_k[i] for i in range(s)] != kv_lengths:
        _bad_tree("cu_seqlens_k must give each segment its ancestors' lengths plus its own, from 0")
    if batch.kv_index.numel() != bounds_k[-1]:
        _bad_tree(f"kv_index must have cu_seqlens_k[-1]={bounds_k[-1]} entries, has {batch.kv_index.numel()}")
    if batch.max_seqlen != max(lengths) or batch.max_seqlen_k != max(kv_lengths):
        _bad_tree(f"max_seqlen/max_seqlen_k must be {max(lengths)}/{max(kv_lengths)}, "
                  f"got {batch.max_seqlen}/{batch.max_seqlen_k}")


def _bad_tree(problem: str) -> None:
    raise ValueError(f"PackedBatch tree fields are inconsistent (a packer bug): {problem}")


def tree_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   batch_meta: TreeAttentionMeta | PackedBatch, *, impl: str = "auto",
                   scale: float | None = None) -> torch.Tensor:
    """Attention over a packed token tree.

    Args:
        q: ``[N, H, D]`` float. k, v: ``[N, Hkv, D]``, ``H % Hkv == 0`` (GQA: query head ``h`` reads KV
            head ``h // (H // Hkv)``). One dtype and device.
        batch_meta: the layout, as :func:`tree_attention_meta` (reuse it across layers: per-backend
            masks are cached in it) or a :class:`PackedBatch` (checked and prepared on every call).
            Its tensors must be on ``q``'s device.
        impl: one of ``IMPLS`` (see the module docstring).
        scale: softmax scale, default ``D ** -0.5``.

    Returns:
        ``[N, H, D]`` in ``q``'s dtype.
    """
    meta = batch_meta if isinstance(batch_meta, TreeAttentionMeta) else tree_attention_meta(batch_meta)
    _check_inputs(q, k, v, meta)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    chosen = resolve_impl(impl, q, k, v)
    if chosen == "reference":
        mask = _prepared(meta, "reference", lambda: reference.tree_mask(meta.segment_ids, meta.parent))
        return reference.reference_tree_attention(q, k, v, mask, scale)
    if chosen == "flex":
        # Compiled on CUDA (the fused kernel); eager on CPU, where compiling costs ~30 s per shape here
        # and buys no backward.
        block_mask = _prepared(meta, "flex", lambda: flex.build_block_mask(meta.segment_ids, meta.parent,
                                                                           compiled=q.is_cuda))
        return flex.flex_tree_attention(q, k, v, block_mask, scale, compiled=q.is_cuda)
    if chosen == "varlen":
        return varlen.varlen_tree_attention(q, k, v, meta.kv_index, meta.cu_seqlens, meta.cu_seqlens_k,
                                            meta.max_seqlen, meta.max_seqlen_k, scale)
    return varlen.gathered_kv_attention_eager(q, k, v, meta.kv_index, meta.cu_seqlens, meta.cu_seqlens_k,
                                              scale)


def _prepared(meta: TreeAttentionMeta, impl: str, build) -> Any:
    key = (impl, str(meta.device))
    if key not in meta.prepared:
        with torch.no_grad():
            meta.prepared[key] = build()
    return meta.prepared[key]


def _check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: TreeAttentionMeta) -> None:
    if q.dim() != 3 or k.dim() != 3 or v.dim() != 3:
        raise ValueError(f"tree_attention takes q [N, H, D], k and v [N, Hkv, D]; got shapes "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if not (q.shape[0] == k.shape[0] == v.shape[0] == meta.num_tokens):
        raise ValueError(f"q, k, v must have one row per layout token (N={meta.num_tokens}); got "
                         f"{q.shape[0]}, {k.shape[0]}, {v.shape[0]}")
    if k.shape != v.shape or q.shape[2] != k.shape[2] or q.shape[1] % k.shape[1]:
        raise ValueError(f"k and v must be [N, Hkv, D] with q's D and H % Hkv == 0; got q "
                         f"{tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype) or not q.is_floating_point():
        raise ValueError(f"q, k, v must share one float dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device == meta.device):
        raise ValueError(f"q, k, v and the layout must be on one device; got {q.device}, {k.device}, "
                         f"{v.device} and layout on {meta.device} (move it with PackedBatch.to(device))")


def resolve_impl(impl: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> str:
    """The backend that will run for ``impl`` on these inputs; raises ``ValueError`` for an unknown impl
    or an explicit one that cannot run here."""
    if impl not in IMPLS:
        raise ValueError(f"unknown tree attention impl={impl!r}; choose one of {', '.join(IMPLS)}")
    if impl == "auto":
        return _auto(q, k)
    reason = unavailable_reason(impl, q, k, v)
    if reason is not None:
        raise ValueError(f"tree attention impl={impl!r} cannot run here: {reason}. "
                         f"Choose another impl ({', '.join(IMPLS)}).")
    return impl


def unavailable_reason(impl: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> str | None:
    """Why backend ``impl`` cannot run on these inputs, or None when it can."""
    if impl == "varlen":
        return varlen.varlen_unavailable_reason(q, k)
    if impl == "flex":
        needs_grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
        if q.device.type == "cpu" and needs_grad:
            return (f"FlexAttention has no backward on CPU (torch {torch.__version__}); use impl='reference' "
                    "or 'varlen_eager', or run the forward under torch.no_grad()")
        if q.device.type not in ("cpu", "cuda"):
            return f"fasteto runs FlexAttention on cpu and cuda only, got {q.device.type}"
    return None


def _auto(q: torch.Tensor, k: torch.Tensor) -> str:
    if q.device.type == "cuda":
        reason = varlen.varlen_unavailable_reason(q, k)
        chosen = "varlen" if reason is None else "flex"
        why = f"kernel {varlen.kernel_name()}" if reason is None else f"varlen cannot run: {reason}"
    else:
        chosen, why = "varlen_eager", f"no fused tree kernel with a backward on {q.device.type}"
    _log_choice_once(chosen, why)
    return chosen


@functools.cache
def _log_choice_once(chosen: str, why: str) -> None:
    log.info("tree attention impl='auto' uses %r (%s)", chosen, why)
