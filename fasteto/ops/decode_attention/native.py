"""Decode attention in the native C++ library (``kernels/cpu/decode_attention.cpp``): one task per (row,
kv head), keys read once for the G dot products per position, values once for the G outputs, float32
accumulation, AVX-512 where the CPU has it. The library is the one the fused log-prob op loads."""

from __future__ import annotations

import torch

from fasteto.ops.logprob.native import unavailable


def decode_attention(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, slots: torch.Tensor,
                     lengths: torch.Tensor, scale: float) -> torch.Tensor:
    """See ``api.decode_attention``."""
    reason = unavailable()
    if reason is not None:
        raise RuntimeError(f"decode attention impl='native' cannot run: {reason}")
    return torch.ops.fasteto_native.decode_attention(query, keys, values, slots, lengths, float(scale))


__all__ = ["decode_attention", "unavailable"]
