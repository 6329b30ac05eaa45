"""The eager oracle of decode attention: each row on its own, float32 math, its slot's first positions."""

from __future__ import annotations

import torch


def decode_attention(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, slots: torch.Tensor,
                     lengths: torch.Tensor, scale: float) -> torch.Tensor:
    """See ``api.decode_attention``."""
    out = torch.empty_like(query)
    for r, (slot, n) in enumerate(zip(slots.tolist(), lengths.tolist(), strict=True)):
        k, v = keys[slot, :, :n].float(), values[slot, :, :n].float()  # [H_kv, n, D]
        scores = scale * query[r].float() @ k.transpose(-1, -2)  # [H_kv, G, n]
        out[r] = (torch.softmax(scores, dim=-1) @ v).to(query.dtype)
    return out
