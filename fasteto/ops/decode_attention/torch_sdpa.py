"""Decode attention through torch's ``scaled_dot_product_attention``: rows in consecutive slots form a
run, attended in one call with the slots' keys and values as a view up to the run's longest row (shorter
rows masked), each kv head's G query heads as its query axis (so no GQA expansion of the keys)."""

from __future__ import annotations

import torch


def decode_attention(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, slots: torch.Tensor,
                     lengths: torch.Tensor, scale: float) -> torch.Tensor:
    """See ``api.decode_attention``."""
    out = torch.empty_like(query)
    for rows, first, longest, mask in runs(slots.tolist(), lengths.tolist(), query.device):
        r = len(rows)
        k, v = keys[first:first + r, :, :longest], values[first:first + r, :, :longest]
        out[rows] = torch.nn.functional.scaled_dot_product_attention(query[rows], k, v, attn_mask=mask,
                                                                     scale=scale)
    return out


def runs(slots: list[int], lengths: list[int], device: torch.device):
    """``(rows [r] long, first slot, longest length, mask [r, 1, 1, longest] bool or None)`` for each run of
    rows in consecutive slots, in slot order; no mask when every row of the run has the longest length."""
    order = sorted(range(len(slots)), key=slots.__getitem__)
    groups: list[list[int]] = []
    for i in order:
        if groups and slots[groups[-1][-1]] + 1 == slots[i]:
            groups[-1].append(i)
        else:
            groups.append([i])
    for rows in groups:
        seen = torch.tensor([lengths[i] for i in rows])
        longest = int(seen.max())
        mask = None
        if int(seen.min()) != longest:
            mask = (torch.arange(longest)[None, :] < seen[:, None])[:, None, None, :].to(device)
        yield torch.tensor(rows, device=device), slots[rows[0]], longest, mask
