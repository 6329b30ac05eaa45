"""Decode attention in the native C++ library (``kernels/cpu/decode_attention.cpp``): one task per (row,
kv head), keys read once for the G dot products per position, values once for the G outputs, float32
accumulation, AVX-512 where the CPU has it. The library is the one the fused log-prob op loads."""

from __future__ import annotations

import functools

import torch

from fasteto.ops.logprob.native import unavailable


def decode_attention(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, slots: torch.Tensor,
                     lengths: torch.Tensor, scale: float) -> torch.Tensor:
    """See ``api.decode_attention``."""
    return _op()(query, keys, values, slots, lengths, float(scale))


@functools.cache  # a decode step calls this once per layer: the library is looked up once per process
def _op():
    reason = unavailable()
    if reason is not None:  # raised, so not cached: a later call looks again
        raise RuntimeError(f"decode attention impl='native' cannot run: {reason}")
    return torch.ops.fasteto_native.decode_attention


__all__ = ["decode_attention", "unavailable"]
