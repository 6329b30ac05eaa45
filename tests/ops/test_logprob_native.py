"""impl="native" (the C++ CPU backend, kernels/cpu/token_logprobs.cpp) against the float32 reference:
forward and every gradient, by the tolerance rule of test_logprob.py (STYLE.md: at most 2x / 3x the error
of plain same-dtype PyTorch, plus a small floor).

The library is built by `pip install --no-build-isolation -e .` (scripts/run.sh, so CI). When it is
missing these tests fail with the reason; FASTETO_NO_NATIVE=1 skips them on a machine that cannot build it.
"""

from __future__ import annotations

import logging
import os

import pytest
import torch
from test_logprob import GRAD_NAMES, assert_rule, ignored_exactly, make_case, rule_errors, run

from fasteto.ops.logprob import fused_token_logprobs, native
from fasteto.ops.logprob.api import _resolve_impl
from fasteto.ops.logprob.reference import token_logprobs_reference
from fasteto.utils.choices import forget_choices


@pytest.fixture
def built():
    if os.environ.get("FASTETO_NO_NATIVE") == "1":
        pytest.skip("FASTETO_NO_NATIVE=1: the native backend is not expected on this machine")
    reason = native.unavailable()
    if reason is not None:
        pytest.fail(f"the native backend is unavailable: {reason} (set FASTETO_NO_NATIVE=1 to skip)")


def native_fn(temperature, chunk=None):
    def fn(h, w, t, b):
        return fused_token_logprobs(h, w, t, b, temperature=temperature, impl="native", chunk_size=chunk)

    return fn


# rows, dim, vocab, chunk_size (rows per pass; None: one pass here), bias, temperature. With 2+ threads
# the vocab is split in tiles among them (4099 and 700 give several per thread); D=300 makes GEMM chunks
# of 436 rows, so 1000 rows take several chunks per pass, and chunk_size several passes.
CASES = [
    (1, 7, 1, None, True, 1.0),
    (5, 123, 123, None, False, 1.0),
    (123, 37, 1031, 16, True, 0.7),
    (40, 48, 500, 7, False, 2.0),
    (37, 64, 4099, None, True, 1.3),
    (5, 33, 1, 2, False, 0.5),
    (1000, 300, 700, None, False, 1.0),
    (1000, 300, 700, 600, True, 0.9),
]


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("rows,dim,vocab,chunk,bias,temperature", CASES)
def test_native_matches_reference(built, rows, dim, vocab, chunk, bias, temperature, dtype):
    case = make_case(rows, dim, vocab, dtype, bias=bias, seed=rows * vocab + dim)
    if rows == 1:
        case["targets"][0] = vocab - 1  # make_case ignores row 0; a single valid row is the edge here
    fn = native_fn(temperature, chunk)
    assert_rule(rule_errors(fn, case, temperature))
    assert ignored_exactly(fn, case)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_all_rows_ignored_give_zeros(built, dtype):
    case = make_case(9, 21, 77, dtype, bias=True, seed=5)
    case["targets"].fill_(-100)
    got = run(native_fn(1.0, chunk=4), case)
    for name, value in got.items():
        assert torch.equal(value, torch.zeros_like(value)), name


def test_zero_dim_hidden_gives_the_bias_softmax(built):
    """D = 0 (the op called directly: fused_token_logprobs cannot flatten [..., 0]): logits = bias."""
    bias, targets = torch.randn(5), torch.tensor([2, -100, 4])
    hidden, weight = torch.empty(3, 0), torch.empty(5, 0)
    logp, _ = torch.ops.fasteto_native.token_logprobs(hidden, weight, targets, bias, 0.7, -100, 0)
    expected = token_logprobs_reference(hidden, weight, targets, bias, 0.7)
    torch.testing.assert_close(logp, expected, rtol=0, atol=1e-6)


def test_matches_torch_backend_closely_in_fp32(built):
    """Same arithmetic up to summation order: native and torch agree far inside the rule's floor."""
    case = make_case(200, 96, 3000, torch.float32, bias=True, seed=9)

    def torch_fn(h, w, t, b):
        return fused_token_logprobs(h, w, t, b, temperature=0.9, impl="torch")

    got, expected = run(native_fn(0.9), case), run(torch_fn, case)
    for name, value in expected.items():
        torch.testing.assert_close(got[name], value, rtol=1e-4, atol=1e-5 * value.abs().max().item())


def test_thread_count_does_not_change_the_result(built):
    case = make_case(64, 40, 2500, torch.float32, bias=True, seed=6)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = run(native_fn(1.0), case)
    finally:
        torch.set_num_threads(threads)
    many = run(native_fn(1.0), case)
    for name, value in one.items():
        torch.testing.assert_close(many[name], value, rtol=1e-5, atol=1e-6 * value.abs().max().item())


def test_leading_batch_dims_and_empty_input(built):
    case = make_case(6, 20, 50, torch.float32, bias=True, seed=1)
    hidden, weight, targets, bias = case["hidden"], case["weight"], case["targets"], case["bias"]
    flat = fused_token_logprobs(hidden, weight, targets, bias, impl="native")
    batched = fused_token_logprobs(hidden.view(2, 3, 20), weight, targets.view(2, 3), bias, impl="native")
    assert batched.shape == (2, 3) and torch.equal(batched.reshape(-1), flat)

    weight = weight.clone().requires_grad_()
    empty = fused_token_logprobs(hidden[:0], weight, targets[:0], impl="native")
    assert empty.shape == (0,) and empty.dtype == torch.float32
    empty.sum().backward()
    assert torch.equal(weight.grad, torch.zeros_like(weight))


def test_nan_input_gives_nan(built):
    case = make_case(8, 16, 300, torch.float32, bias=False, seed=8)
    case["hidden"][1, 3] = float("nan")
    logp = fused_token_logprobs(case["hidden"], case["weight"], case["targets"], impl="native")
    assert torch.isnan(logp[1]) and torch.isfinite(logp[2:]).all()


def test_torch_compile_traces_the_op(built):
    case = make_case(9, 16, 70, torch.float32, bias=True, seed=2)
    fn = native_fn(0.8, chunk=4)
    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
    eager, traced = run(fn, case), run(compiled, case)
    assert set(traced) == {"logp", *GRAD_NAMES}
    for name, value in eager.items():
        torch.testing.assert_close(traced[name], value, rtol=1e-6, atol=1e-6)


def test_library_ops_have_fakes_and_schemas(built):
    """The C++ ops called directly: torch.library's consistency checks (schema, fake vs real, compile)."""
    case = make_case(7, 12, 40, torch.float32, bias=True, seed=3)
    args = (case["hidden"], case["weight"], case["targets"], case["bias"], 0.9, -100, 0)
    torch.library.opcheck(torch.ops.fasteto_native.token_logprobs.default, args)
    _, lse = torch.ops.fasteto_native.token_logprobs(*args)
    backward_args = (case["coeff"], *args[:4], lse, *args[4:])
    torch.library.opcheck(torch.ops.fasteto_native.token_logprobs_backward.default, backward_args)


def test_cpp_checks_name_the_argument(built):
    ops = torch.ops.fasteto_native
    hidden, weight, targets = torch.randn(4, 8), torch.randn(10, 8), torch.tensor([1, 2, 3, -100])
    with pytest.raises(RuntimeError, match=r"targets\[1\] = 10"):
        ops.token_logprobs(hidden, weight, torch.tensor([1, 10, 3, 0]), None, 1.0, -100, 0)
    with pytest.raises(RuntimeError, match="weight must have hidden's dtype"):
        ops.token_logprobs(hidden, weight.double(), targets, None, 1.0, -100, 0)
    with pytest.raises(RuntimeError, match="bias must be"):
        ops.token_logprobs(hidden, weight, targets, torch.randn(9), 1.0, -100, 0)
    with pytest.raises(RuntimeError, match="temperature"):
        ops.token_logprobs(hidden, weight, targets, None, 0.0, -100, 0)
    with pytest.raises(RuntimeError, match="lse must be"):
        ops.token_logprobs_backward(torch.randn(4), hidden, weight, targets, None, torch.randn(3), 1.0,
                                    -100, 0)


def test_autocast_casts_an_fp32_head_like_linear(built):
    case = make_case(7, 16, 40, torch.float32, bias=True, seed=4)
    hidden = case["hidden"].bfloat16()
    weight, bias = (case[name].clone().requires_grad_() for name in ("weight", "bias"))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logp = fused_token_logprobs(hidden, weight, case["targets"], bias, impl="native")
        logp.sum().backward()
    expected = fused_token_logprobs(hidden, weight.bfloat16(), case["targets"], bias.bfloat16(),
                                    impl="native")
    assert torch.equal(logp, expected)
    assert weight.grad.dtype == torch.float32 and weight.grad.abs().sum() > 0


def test_auto_picks_native_on_cpu_and_logs_once(built, caplog):
    case = make_case(4, 8, 30, torch.float32, bias=False, seed=3)
    args = (case["hidden"], case["weight"], case["targets"])
    forget_choices()
    with caplog.at_level(logging.INFO, logger="fasteto.auto"):
        first = fused_token_logprobs(*args)
        fused_token_logprobs(*args)
    assert [r.getMessage() for r in caplog.records] == [
        "fused_token_logprobs impl (cpu): auto chose 'native' (the native C++ library is built)"]
    assert torch.equal(first, fused_token_logprobs(*args, impl="native"))


def test_explicit_native_without_library_raises(monkeypatch, tmp_path, caplog):
    """No library at the searched paths: impl="native" raises naming the fix; auto takes torch."""
    monkeypatch.setattr(native, "library_candidates", lambda: [tmp_path / "_native" / "libfasteto_native.so"])
    case = make_case(4, 8, 30, torch.float32, bias=False, seed=3)
    args = (case["hidden"], case["weight"], case["targets"])
    with pytest.raises(RuntimeError, match=r"impl='native' cannot run: the native library is not built "
                                           r".*pip install --no-build-isolation -e \."):
        fused_token_logprobs(*args, impl="native")
    forget_choices()
    try:
        with caplog.at_level(logging.INFO, logger="fasteto.auto"):
            got = fused_token_logprobs(*args)
    finally:
        forget_choices()
    (message,) = [r.getMessage() for r in caplog.records]
    assert message.startswith("fused_token_logprobs impl (cpu): auto chose 'torch' (no native backend: ")
    torch.testing.assert_close(got, token_logprobs_reference(*args), rtol=0, atol=1e-5)


def test_explicit_native_off_cpu_raises():
    with pytest.raises(RuntimeError, match="impl='native' cannot run: .*native backend is CPU-only"):
        _resolve_impl("native", torch.device("cuda", 0))
