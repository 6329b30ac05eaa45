"""Public tree attention: one function, explicit backends.

The layout is a packed token tree given as raw tensors (:func:`tree_attention_meta`): ``S`` segments of
consecutive tokens, each segment's parent segment, and for each segment the flat list of key rows it reads
(its ancestors' tokens, then its own). Token ``i`` attends to token ``j`` iff ``j`` is in a strict
ancestor segment of ``seg(i)``, or in the same segment with ``j <= i``. ``fasteto.packing`` builds such
layouts; ``fasteto.models.packed`` runs them through transformers models. This module imports neither.

Backends (``impl=``):

- ``"reference"``: dense SDPA with an explicit ``[N, N]`` mask; any device, any float dtype; the oracle.
- ``"flex"``: FlexAttention with a ``BlockMask`` built from the tree (compiled on CUDA; eager on CPU,
  forward only: FlexAttention has no CPU backward).
- ``"varlen"``: FlashAttention varlen over the gathered-KV view (CUDA, fp16/bf16).
- ``"varlen_eager"``: the same gathered-KV computation segment by segment with SDPA; any device. It
  tests the ``kv_index``/``cu_seqlens_k`` layout without a GPU, and is the CPU training backend.
- ``"auto"``: ``varlen`` when it can run, else ``flex`` on CUDA; ``varlen_eager`` elsewhere (per-segment
  SDPA over gathered keys: no dense ``[N, N]`` mask, so it costs what the sequences cost, not ``N²``).
  Recorded and logged once (``fasteto.utils.choices``).

An explicit ``impl`` that cannot run raises ``ValueError`` with the reason; nothing falls back silently.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from fasteto.ops.tree_attention import flex, reference, varlen
from fasteto.utils.choices import record_choice

IMPLS = ("auto", "reference", "flex", "varlen", "varlen_eager")


@dataclass
class TreeAttentionMeta:
    """A checked tree layout, plus per-backend structures built on first use (the dense mask, the
    ``BlockMask``) and reused by every layer of a forward. Make it with :func:`tree_attention_meta`.

    segment_ids: ``[N]`` int32. cu_seqlens: ``[S + 1]`` int32. parent: ``[S]`` long.
    kv_index: ``[Nk]`` long. cu_seqlens_k: ``[S + 1]`` int32. max_seqlen, max_seqlen_k: ints (the longest
    segment, and the most keys any token reads: the longest root-to-leaf sequence).
    """

    segment_ids: torch.Tensor
    cu_seqlens: torch.Tensor
    parent: torch.Tensor
    kv_index: torch.Tensor
    cu_seqlens_k: torch.Tensor
    max_seqlen: int
    max_seqlen_k: int
    prepared: dict[tuple[str, str], Any] = field(default_factory=dict, repr=False)

    @property
    def num_tokens(self) -> int:
        return int(self.segment_ids.numel())

    @property
    def device(self) -> torch.device:
        return self.segment_ids.device


def tree_attention_meta(cu_seqlens: torch.Tensor, parent: torch.Tensor, kv_index: torch.Tensor,
                        cu_seqlens_k: torch.Tensor) -> TreeAttentionMeta:
    """Check a tree layout once and keep what attention needs.

    Args:
        cu_seqlens: ``[S + 1]`` int, rising strictly from 0 to ``N``: segment ``s`` is tokens
            ``cu_seqlens[s]:cu_seqlens[s + 1]``.
        parent: ``[S]`` int, ``-1`` for a root, else an earlier segment (depth-first order).
        kv_index: ``[Nk]`` int, the token rows each segment reads as keys: segment ``s``'s slice
            ``cu_seqlens_k[s]:cu_seqlens_k[s + 1]`` lists its ancestors' tokens root first, then its own.
        cu_seqlens_k: ``[S + 1]`` int, from 0; each segment's length plus its ancestors'.
        All on one device (the device attention runs on).

    Raises ``ValueError`` naming the inconsistent argument.
    """
    lengths, kv_lengths = _check_tree(cu_seqlens, parent, kv_index, cu_seqlens_k)
    segment_ids = torch.repeat_interleave(torch.arange(len(lengths), dtype=torch.int32),
                                          torch.tensor(lengths)).to(cu_seqlens.device)
    return TreeAttentionMeta(
        segment_ids=segment_ids, cu_seqlens=cu_seqlens.to(torch.int32), parent=parent.long(),
        kv_index=kv_index.long(), cu_seqlens_k=cu_seqlens_k.to(torch.int32),
        max_seqlen=max(lengths), max_seqlen_k=max(kv_lengths))


def _check_tree(cu_seqlens: torch.Tensor, parent: torch.Tensor, kv_index: torch.Tensor,
                cu_seqlens_k: torch.Tensor) -> tuple[list[int], list[int]]:
    """Structural checks (one host sync per micro-batch); returns segment and key lengths."""
    bounds, parents, bounds_k = cu_seqlens.tolist(), parent.tolist(), cu_seqlens_k.tolist()
    s = len(parents)
    lengths = [bounds[i + 1] - bounds[i] for i in range(len(bounds) - 1)]
    if s == 0 or len(bounds) != s + 1 or bounds[0] != 0 or min(lengths) < 1:
        _bad_tree(f"cu_seqlens must rise strictly from 0 in S={s} steps (S = len(parent) > 0), "
                  f"got {bounds[:8]}")
    if any(not -1 <= p < i for i, p in enumerate(parents)):
        _bad_tree(f"parent[s] must be -1 or < s (segments in depth-first order), got {parents[:8]}")
    kv_lengths: list[int] = []
    for i, p in enumerate(parents):
        kv_lengths.append(lengths[i] + (kv_lengths[p] if p >= 0 else 0))
    if len(bounds_k) != s + 1 or bounds_k[0] != 0 or \
            [bounds_k[i + 1] - bounds_k[i] for i in range(s)] != kv_lengths:
        _bad_tree("cu_seqlens_k must give each segment its ancestors' lengths plus its own, from 0")
    if kv_index.numel() != bounds_k[-1]:
        _bad_tree(f"kv_index must have cu_seqlens_k[-1]={bounds_k[-1]} entries, has {kv_index.numel()}")
    return lengths, kv_lengths


def _bad_tree(problem: str) -> None:
    raise ValueError(f"tree layout is inconsistent (a packer bug): {problem}")


def tree_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: TreeAttentionMeta, *,
                   impl: str = "auto", scale: float | None = None) -> torch.Tensor:
    """Attention over a packed token tree.

    Args:
        q: ``[N, H, D]`` float. k, v: ``[N, Hkv, D]``, ``H % Hkv == 0`` (GQA: query head ``h`` reads KV
            head ``h // (H // Hkv)``). One dtype and device.
        meta: the layout, from :func:`tree_attention_meta` (reuse it across layers: per-backend masks
            are cached in it), on ``q``'s device.
        impl: one of ``IMPLS`` (see the module docstring).
        scale: softmax scale, default ``D ** -0.5``.

    Returns:
        ``[N, H, D]`` in ``q``'s dtype.
    """
    if not isinstance(meta, TreeAttentionMeta):
        raise TypeError("meta must be a TreeAttentionMeta (from tree_attention_meta), "
                        f"got {type(meta).__name__}")
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
                         f"{v.device} and layout on {meta.device} (build the layout on q's device)")


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
    record_choice(f"tree_attention impl ({q.device.type})", chosen, why)
    return chosen
