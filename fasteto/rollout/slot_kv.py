"""Per-row key/value slots and the attention that reads them, for the continuous engine.

Each row (an episode's conversation) owns a slot: per layer, keys and values ``[H_kv, C, D]`` of every
token it has run, kept between turns, so a new turn runs only its new tokens. One forward of the model
runs a *packed step*: the new tokens of every row that takes part (a whole prompt tail for a row that
joins, one token for a row that is decoding) laid end to end as batch 1, ``[1, N]``, each token with its
slot and its position in that slot. The model's weights are read once per step for all rows.

Inside the model this goes through transformers' public extension points only: the step is the
``cache=`` of the forward (an object whose ``update`` writes each token's key and value into its slot),
and the attention function registered as ``"fasteto_slots"`` reads each row's keys and values straight
from its slot (no gather into a padded batch), causally, through ``scaled_dot_product_attention``. The
name is unknown to transformers' mask registry, so the model builds no mask of its own.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch
from torch import nn
from transformers import AttentionInterface, PreTrainedModel

from fasteto.ops.decode_attention.api import backend as decode_attention_backend

ATTENTION_NAME = "fasteto_slots"


class SlotStore:
    """The KV of ``num_slots`` rows: per layer, keys and values ``[S, H_kv, C, D]`` (C grows on demand).

    ``valid[s]`` (``[L_s]`` int64) are the token ids whose KV sits in slot ``s`` at positions ``0..L_s-1``.
    """

    def __init__(self, num_layers: int, num_slots: int, kv_heads: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device, capacity: int = 512, limit: int | None = None):
        self.num_layers, self.num_slots = num_layers, num_slots
        self.limit = limit  # no slot ever needs more positions (the engine's context cap), or None
        capacity = capacity if limit is None else min(capacity, limit)
        self.shape = (num_slots, kv_heads, capacity, head_dim)
        self.dtype, self.device = dtype, device
        self.keys = [torch.zeros(self.shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.zeros(self.shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.valid = [np.zeros(0, dtype=np.int64) for _ in range(num_slots)]

    @property
    def capacity(self) -> int:
        return self.shape[2]

    def reserve(self, tokens: int) -> None:
        """Make room for ``tokens`` positions per slot: doubling (so growth copies O(total) in all), but
        never past ``limit`` when ``tokens`` is within it."""
        if tokens <= self.capacity:
            return
        new = max(tokens, 2 * self.capacity)
        if self.limit is not None and tokens <= self.limit:
            new = min(new, self.limit)
        self.shape = (*self.shape[:2], new, self.shape[3])
        for buffers in (self.keys, self.values):
            for i, old in enumerate(buffers):
                grown = torch.zeros(self.shape, dtype=self.dtype, device=self.device)
                grown[:, :, :old.shape[2]] = old
                buffers[i] = grown

    def copy_prefix(self, source: int, target: int, n: int) -> None:
        """Slot ``target`` takes the first ``n`` tokens of slot ``source`` (KV and ids)."""
        for buffers in (self.keys, self.values):
            for layer in buffers:
                layer[target, :, :n] = layer[source, :, :n]
        self.valid[target] = self.valid[source][:n].copy()

    def memory_bytes(self) -> int:
        return 2 * sum(k.numel() * k.element_size() for k in self.keys)


@dataclass
class PackedStep:
    """One forward's layout: segment ``i`` holds ``lengths[i]`` new tokens of slot ``slots[i]``, at slot
    positions ``starts[i] ..`` (positions before ``starts[i]`` are already in the slot).

    ``token_slot``, ``token_pos``: ``[N]`` long, each packed token's slot and position. ``last``: ``[R]``
    long, the packed index of each segment's last token (whose logits pick the row's next token).
    ``decode_index``, ``decode_slots``, ``decode_lengths``: ``[r]`` long, for the segments of one token
    (decoding rows): their packed token, slot, and the slot positions they attend to (``start + 1``);
    ``attention``: the decode attention backend (``fasteto.ops.decode_attention``).
    """

    store: SlotStore
    slots: list[int]
    starts: list[int]
    lengths: list[int]
    token_slot: torch.Tensor
    token_pos: torch.Tensor
    last: torch.Tensor
    decode_index: torch.Tensor
    decode_slots: torch.Tensor
    decode_lengths: torch.Tensor
    attention: str = "torch"

    @classmethod
    def build(cls, store: SlotStore, slots: list[int], starts: list[int], lengths: list[int],
              attention: str = "torch") -> PackedStep:
        device = store.device
        token_slot = torch.repeat_interleave(torch.tensor(slots), torch.tensor(lengths)).to(device)
        positions = [torch.arange(s, s + n) for s, n in zip(starts, lengths, strict=True)]
        token_pos = torch.cat(positions).to(device)
        last = torch.tensor(lengths).cumsum(0) - 1
        one = [i for i, n in enumerate(lengths) if n == 1]
        decode = [last[one].tolist(), [slots[i] for i in one], [starts[i] + 1 for i in one]]
        index, decode_slots, seen = (torch.tensor(x, dtype=torch.long, device=device) for x in decode)
        return cls(store, slots, starts, lengths, token_slot, token_pos, last.to(device), index, decode_slots,
                   seen, attention)

    @cached_property
    def decode_attention(self):
        """The ``attention`` backend's function, looked up once per step (not once per layer)."""
        return decode_attention_backend(self.attention, self.store.device)

    @property
    def position_ids(self) -> torch.Tensor:
        """``[1, N]``: RoPE positions of the packed tokens."""
        return self.token_pos[None]

    # The cache protocol the decoder layers use: ``cache.update(key, value, layer_idx, ...)``.
    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        """Write the packed tokens' keys/values ``[1, H_kv, N, D]`` into their slots; return them as given
        (the slot attention reads the slots, not these)."""
        self.write(layer_idx, key_states[0].transpose(0, 1), value_states[0].transpose(0, 1))
        return key_states, value_states

    def write(self, layer_idx: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Write the packed tokens' ``keys`` and ``values`` ``[N, H_kv, D]`` into their slots."""
        store_keys, store_values = self.store.keys[layer_idx], self.store.values[layer_idx]
        store_keys[self.token_slot, :, self.token_pos] = keys.to(store_keys.dtype)
        store_values[self.token_slot, :, self.token_pos] = values.to(store_values.dtype)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0  # positions come from position_ids; nothing in the model may derive them from this


def slot_attention_forward(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                           attention_mask: torch.Tensor | None, dropout: float = 0.0,
                           scaling: float | None = None, *, slot_step: PackedStep | None = None,
                           sliding_window: int | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """An ``AttentionInterface`` function: each segment of ``query`` ``[1, H, N, D]`` attends to its slot's
    tokens up to its own position (causal), GQA included. Returns ``([1, N, H, D], None)``."""
    if slot_step is None:
        raise ValueError(f"{type(module).__name__} uses attention {ATTENTION_NAME!r} but the forward got no "
                         "slot_step=; only the continuous engine runs this attention")
    if dropout or attention_mask is not None:
        raise NotImplementedError("slot attention has no dropout and takes no extra mask")
    return slot_attend(module.layer_idx, query, slot_step, scaling, sliding_window), None


def slot_attend(layer_idx: int, query: torch.Tensor, step: PackedStep, scaling: float | None = None,
                sliding_window: int | None = None) -> torch.Tensor:
    """Layer ``layer_idx``'s attention over the slots for ``query`` ``[1, H, N, D]`` (any strides): each
    segment attends causally to its slot up to its own positions. Returns ``[1, N, H, D]``."""
    keys, values = step.store.keys[layer_idx], step.store.values[layer_idx]
    out = query.new_empty(1, query.shape[2], query.shape[1], query.shape[3])
    offset = 0
    for slot, start, n in zip(step.slots, step.starts, step.lengths, strict=True):
        if sliding_window is not None and start + n > sliding_window:
            raise NotImplementedError(f"a row reached {start + n} tokens, past sliding_window="
                                      f"{sliding_window}; slot attention has no window")
        if n > 1:
            _prefill(query, keys, values, out, slot, start, n, offset, scaling)
        offset += n
    if len(step.decode_index):
        _decode(query, keys, values, out, step, query.shape[3] ** -0.5 if scaling is None else scaling)
    return out


def _prefill(query, keys, values, out, slot: int, start: int, n: int, offset: int, scaling) -> None:
    """Segment ``query[:, :, offset:offset + n]`` (``n > 1`` tokens at slot positions ``start ..``) attends
    causally to its slot; written into ``out`` ``[1, N, H, D]``."""
    q = query[:, :, offset:offset + n]
    k, v = keys[slot:slot + 1, :, :start + n], values[slot:slot + 1, :, :start + n]
    mask = None
    if start > 0:  # causal, aligned bottom-right: query i sees positions <= start + i
        mask = torch.ones(n, start + n, dtype=torch.bool, device=q.device).tril(diagonal=start)
    o = torch.nn.functional.scaled_dot_product_attention(
        q, k.to(q.dtype), v.to(q.dtype), attn_mask=mask, is_causal=start == 0, scale=scaling, enable_gqa=True)
    out[0, offset:offset + n] = o[0].transpose(0, 1)


def _decode(query, keys, values, out, step: PackedStep, scale: float) -> None:
    """The decoding rows (one new token each) in one call: each kv head's G query heads are its queries
    (``[r, H_kv, G, D]``), so a slot's keys and values are read once per kv head, not once per query head."""
    heads, dim = query.shape[1], query.shape[3]
    r, kv_heads = len(step.decode_index), keys.shape[1]
    q = query[0, :, step.decode_index].transpose(0, 1).reshape(r, kv_heads, heads // kv_heads, dim)
    o = step.decode_attention(q.contiguous(), keys, values, step.decode_slots, step.decode_lengths, scale)
    out[0, step.decode_index] = o.reshape(r, heads, dim)


@contextmanager
def slot_attention(model: PreTrainedModel) -> Iterator[PreTrainedModel]:
    """``model`` (this instance) switched to slot attention inside the block, its previous attention
    restored after (also on error). Registers ``"fasteto_slots"`` in ``AttentionInterface`` first
    (idempotent; nothing registers at import)."""
    AttentionInterface.register(ATTENTION_NAME, slot_attention_forward)
    previous = model.config._attn_implementation
    model.set_attn_implementation(ATTENTION_NAME)
    try:
        yield model
    finally:
        model.set_attn_implementation(previous)


def kv_shape(model: PreTrainedModel) -> tuple[int, int, int]:
    """(layers, kv heads, head dim) of a decoder-only model's full-attention KV."""
    config = model.config.get_text_config(decoder=True)
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return config.num_hidden_layers, getattr(config, "num_key_value_heads", None) or heads, head_dim
