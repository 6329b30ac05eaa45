"""Decode attention: every backend against the per-row float32 reference, the runs the torch backend
forms, and the errors."""

from __future__ import annotations

import pytest
import torch

from fasteto.ops.decode_attention import decode_attention
from fasteto.ops.decode_attention import native as native_backend
from fasteto.ops.decode_attention.api import resolve
from fasteto.ops.decode_attention.reference import decode_attention as reference
from fasteto.ops.decode_attention.torch_sdpa import runs
from fasteto.utils.choices import auto_choices, forget_choices

NATIVE = pytest.mark.skipif(native_backend.unavailable() is not None,
                            reason=str(native_backend.unavailable()))
TOLERANCE = {torch.float32: 2e-6, torch.bfloat16: 1e-2, torch.float16: 2e-3}


def inputs(rows, kv_heads, groups, dim, num_slots, capacity, dtype, seed=0, slots=None, lengths=None):
    g = torch.Generator().manual_seed(seed)
    query = torch.randn(rows, kv_heads, groups, dim, generator=g).to(dtype)
    keys = torch.randn(num_slots, kv_heads, capacity, dim, generator=g).to(dtype)
    values = torch.randn(num_slots, kv_heads, capacity, dim, generator=g).to(dtype)
    slots = torch.randint(0, num_slots, (rows,), generator=g) if slots is None else torch.tensor(slots)
    if lengths is None:
        lengths = torch.randint(1, capacity + 1, (rows,), generator=g)
    lengths = torch.as_tensor(lengths)
    return query, keys, values, slots, lengths


def test_reference_on_a_hand_computed_case():
    """One row, one head, two positions: weights softmax([0, 1 * 2]) over values 1 and 3."""
    query = torch.tensor([[[[1.0, 0.0]]]])
    keys = torch.tensor([[[[0.0, 5.0], [1.0, 0.0], [9.0, 9.0]]]])
    values = torch.tensor([[[[1.0, 0.0], [3.0, 0.0], [100.0, 100.0]]]])
    out = reference(query, keys, values, torch.tensor([0]), torch.tensor([2]), scale=2.0)
    w = torch.softmax(torch.tensor([0.0, 2.0]), 0)
    torch.testing.assert_close(out[0, 0, 0], torch.tensor([w[0] * 1 + w[1] * 3, 0.0]))


@pytest.mark.parametrize("impl", ["torch", pytest.param("native", marks=NATIVE)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kv_heads,groups,dim", [(3, 3, 64), (2, 1, 128), (1, 4, 48), (2, 2, 8)])
def test_backend_matches_reference(impl, dtype, kv_heads, groups, dim):
    """Random slots (repeats, gaps, any order) and lengths 1..C (so partial blocks of 16); natively, D=64
    and 128 take the blocked paths (bf16 with AVX-512 BF16: vdpbf16ps scores), 48 the generic AVX-512 one
    and 8 the scalar one."""
    args = inputs(7, kv_heads, groups, dim, num_slots=5, capacity=37, dtype=dtype)
    out = decode_attention(*args, scale=dim ** -0.5, impl=impl)
    expected = reference(*args, scale=dim ** -0.5)
    assert out.dtype == dtype and out.shape == args[0].shape
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(out.float(), expected.float(), rtol=tol, atol=tol)


@NATIVE
def test_native_reads_no_position_past_a_rows_length():
    query, keys, values, slots, lengths = inputs(3, 2, 3, 64, num_slots=3, capacity=20, dtype=torch.float32,
                                                 slots=[2, 0, 1], lengths=[5, 1, 20])
    before = decode_attention(query, keys, values, slots, lengths, 0.125, impl="native")
    keys[2, :, 5:] = float("nan")  # beyond row 0's length in its slot
    values[0, :, 1:] = float("nan")
    after = decode_attention(query, keys, values, slots, lengths, 0.125, impl="native")
    assert torch.equal(before, after)


@NATIVE
def test_native_op_has_a_fake_and_a_schema():
    """torch.library's consistency checks of the C++ op called directly (schema, fake vs real, compile)."""
    args = inputs(4, 2, 3, 64, num_slots=3, capacity=21, dtype=torch.bfloat16, seed=2)
    torch.library.opcheck(torch.ops.fasteto_native.decode_attention.default, (*args, 0.125))


def test_torch_backend_groups_consecutive_slots_into_runs():
    found = [(rows.tolist(), first, longest, None if mask is None else mask[:, 0, 0].tolist())
             for rows, first, longest, mask in runs([3, 0, 1, 5, 6], [11, 5, 8, 2, 2], torch.device("cpu"))]
    assert found == [([1, 2], 0, 8, [[True] * 5 + [False] * 3, [True] * 8]), ([0], 3, 11, None),
                     ([3, 4], 5, 2, None)]


@NATIVE
@pytest.mark.parametrize("bad,match", [
    (lambda a: (a[0], a[1], a[2], torch.tensor([0, 9]), a[4]), "names slot 9"),
    (lambda a: (a[0], a[1], a[2], a[3], torch.tensor([0, 3])), "length 0"),
    (lambda a: (a[0], a[1], a[2], a[3], torch.tensor([1, 99])), "length 99"),
    (lambda a: (a[0].double(), a[1], a[2], a[3], a[4]), "share a dtype"),
    (lambda a: (a[0][:, :1], a[1], a[2], a[3], a[4]), "disagree"),
])
def test_native_refuses_bad_input_with_the_reason(bad, match):
    args = inputs(2, 2, 3, 16, num_slots=3, capacity=8, dtype=torch.float32, lengths=[2, 3])
    with pytest.raises(RuntimeError, match=match):
        decode_attention(*bad(args), scale=0.25, impl="native")


def test_auto_records_its_choice_and_unknown_impls_are_refused(monkeypatch):
    forget_choices()
    chosen = resolve("auto", torch.device("cpu"))
    assert auto_choices()["decode attention impl (cpu)"]["chosen"] == chosen
    monkeypatch.setattr(native_backend, "unavailable", lambda: "not built here")
    forget_choices()
    assert resolve("auto", torch.device("cpu")) == "torch"
    assert "not built here" in auto_choices()["decode attention impl (cpu)"]["why"]
    with pytest.raises(RuntimeError, match="not built here"):
        resolve("native", torch.device("cpu"))
    with pytest.raises(ValueError, match="one of auto, native, torch, reference"):
        resolve("flash", torch.device("cpu"))
