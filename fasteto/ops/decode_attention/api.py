"""Decode attention over per-row KV slots, with an explicit backend."""

from __future__ import annotations

import torch

from fasteto.utils.choices import record_choice

DECODE_ATTENTION_IMPLS = ("auto", "native", "torch", "reference")


def decode_attention(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, slots: torch.Tensor,
                     lengths: torch.Tensor, scale: float, impl: str = "auto") -> torch.Tensor:
    """Each decoding row's new token attends to the first ``lengths[r]`` positions of its slot.

    Args:
        query: ``[R, H_kv, G, D]``: row ``r``'s query heads, grouped by the kv head they read (query head
            ``h * G + g`` reads kv head ``h``, as transformers' GQA does).
        keys, values: ``[S, H_kv, C, D]`` contiguous, query's dtype: every slot's cached keys and values.
        slots: ``[R]`` long, each row's slot. lengths: ``[R]`` long in ``1..C``, positions it attends to.
        scale: multiplies the dot products.
        impl: ``"native"`` (C++ kernel, CPU), ``"torch"`` (SDPA over runs of consecutive slots),
            ``"reference"`` (per row, float32), or ``"auto"`` (native on CPU when its library is built,
            else torch; recorded).

    Returns:
        ``[R, H_kv, G, D]`` in query's dtype.
    """
    return backend(impl, query.device)(query, keys, values, slots, lengths, scale)


def resolve(impl: str, device: torch.device) -> str:
    """The backend ``impl`` runs on ``device``; an explicit one that cannot run raises with the reason."""
    if impl not in DECODE_ATTENTION_IMPLS:
        raise ValueError(f"decode attention impl must be one of {', '.join(DECODE_ATTENTION_IMPLS)}; "
                         f"got {impl!r}")
    if impl in ("torch", "reference"):
        return impl
    from fasteto.ops.decode_attention import native

    reason = "it runs on the CPU only" if device.type != "cpu" else native.unavailable()
    if impl == "native":
        if reason is not None:
            raise RuntimeError(f"decode attention impl='native' cannot run: {reason}")
        return "native"
    chosen = "native" if reason is None else "torch"
    record_choice(f"decode attention impl ({device.type})", chosen,
                  "the native library is built" if reason is None else f"native cannot run: {reason}")
    return chosen


def backend(impl: str, device: torch.device):
    """The function ``impl`` runs on ``device`` (resolved as ``resolve`` does), for callers that make many
    calls with one choice."""
    chosen = resolve(impl, device)
    if chosen == "native":
        from fasteto.ops.decode_attention.native import decode_attention as run
    elif chosen == "torch":
        from fasteto.ops.decode_attention.torch_sdpa import decode_attention as run
    else:
        from fasteto.ops.decode_attention.reference import decode_attention as run
    return run
