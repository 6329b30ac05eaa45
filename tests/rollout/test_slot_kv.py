"""Slot attention (the continuous engine's op): its layout, exactly, and its output against an eager
float64 reference that attends each packed token to its slot's positions one at a time."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from fasteto.ops.decode_attention.native import unavailable
from fasteto.rollout.slot_kv import PackedStep, SlotStore, slot_attention_forward


def reference(query: torch.Tensor, store: SlotStore, step: PackedStep, scale: float) -> torch.Tensor:
    """``[1, N, H, D]`` float64: packed token t of slot s at position p attends to slot s's 0..p."""
    keys, values = store.keys[0].double(), store.values[0].double()
    heads, kv_heads = query.shape[1], keys.shape[1]
    out = torch.zeros(1, query.shape[2], heads, query.shape[3], dtype=torch.float64)
    for t, (slot, pos) in enumerate(zip(step.token_slot.tolist(), step.token_pos.tolist(), strict=True)):
        for h in range(heads):
            kv = h // (heads // kv_heads)
            scores = [scale * float(query[0, h, t].double() @ keys[slot, kv, j]) for j in range(pos + 1)]
            top = max(scores)
            weights = [math.exp(s - top) for s in scores]
            total = sum(weights)
            out[0, t, h] = sum(w / total * values[slot, kv, j] for j, w in enumerate(weights))
    return out


NATIVE = pytest.mark.skipif(unavailable() is not None, reason=str(unavailable()))
IMPLS = ["torch", "reference", pytest.param("native", marks=NATIVE)]


def test_packed_step_lists_its_decoding_rows_exactly():
    store = SlotStore(num_layers=1, num_slots=6, kv_heads=1, head_dim=2, dtype=torch.float32,
                      device=torch.device("cpu"), capacity=16)
    step = PackedStep.build(store, slots=[3, 0, 5, 1], starts=[10, 4, 0, 7], lengths=[1, 1, 6, 1])
    assert step.decode_index.tolist() == [0, 1, 8]
    assert step.decode_slots.tolist() == [3, 0, 1]
    assert step.decode_lengths.tolist() == [11, 5, 8]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
def test_slot_attention_matches_the_reference_for_mixed_steps(dtype, tol, impl):
    """Decoding rows in slots 0-2 (unequal lengths) and 4, a prefill from position 0 and one after a
    cached prefix, GQA with 3 query heads per kv head."""
    torch.manual_seed(0)
    kv_heads, group, dim = 2, 3, 8
    store = SlotStore(num_layers=1, num_slots=6, kv_heads=kv_heads, head_dim=dim, dtype=dtype,
                      device=torch.device("cpu"), capacity=32)
    for buffers in (store.keys, store.values):
        buffers[0].normal_()
    step = PackedStep.build(store, slots=[4, 0, 5, 1, 2, 3], starts=[9, 12, 0, 5, 7, 3],
                            lengths=[1, 1, 4, 1, 1, 5], attention=impl)
    n = sum(step.lengths)
    query = torch.randn(1, kv_heads * group, n, dim, dtype=dtype)
    new_kv = torch.randn(2, 1, kv_heads, n, dim, dtype=dtype)
    step.update(new_kv[0], new_kv[1], layer_idx=0)
    module = SimpleNamespace(layer_idx=0)
    out, _ = slot_attention_forward(module, query, new_kv[0], new_kv[1], None, scaling=dim ** -0.5,
                                    slot_step=step)
    assert out.shape == (1, n, kv_heads * group, dim) and out.dtype == dtype
    expected = reference(query, store, step, dim ** -0.5)
    torch.testing.assert_close(out.double(), expected, rtol=tol, atol=tol)


def test_slot_attention_refuses_a_forward_without_the_step():
    with pytest.raises(ValueError, match="slot_step"):
        slot_attention_forward(SimpleNamespace(layer_idx=0), torch.zeros(1, 1, 1, 1), None, None, None)


def test_reserve_doubles_but_stops_at_the_limit():
    store = SlotStore(num_layers=1, num_slots=1, kv_heads=1, head_dim=1, dtype=torch.float32,
                      device=torch.device("cpu"), capacity=4, limit=12)
    store.keys[0][0, 0, :4, 0] = torch.arange(4.0)
    store.reserve(5)
    assert store.capacity == 8
    store.reserve(9)
    assert store.capacity == 12  # not 16: no slot needs more than the limit
    assert store.keys[0][0, 0, :4, 0].tolist() == [0.0, 1.0, 2.0, 3.0]
    store.reserve(13)  # past the limit (a caller without one): grows as asked
    assert store.capacity == 24
