"""fused_token_logprobs: every backend against the float32 reference, forward and every gradient.

Tolerance rule (STYLE.md, from FlashAttention): against the float32 reference, a backend's error may be at
most 2x (forward) or 3x (gradients) that of plain same-dtype PyTorch, plus a small floor.

The Triton kernels run under the interpreter in a subprocess: ``TRITON_INTERPRET=1`` must be set before
the kernels are defined, and setting it in this process would also turn the GPU tests into interpreter
runs. Run as a script (``TRITON_INTERPRET=1 python tests/ops/test_logprob.py``) this file prints the
interpreted cases' errors as one JSON line.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fasteto.ops.logprob import fused_token_logprobs, native
from fasteto.ops.logprob.reference import token_logprobs_reference
from fasteto.utils.choices import forget_choices

GRAD_NAMES = ("grad_hidden", "grad_weight", "grad_bias")


def make_case(rows, dim, vocab, dtype, *, bias, seed, device="cpu"):
    """Random inputs (never zeros): logits of std ~3 so the softmax is peaked, every 4th target ignored,
    and a random upstream gradient ``coeff``."""
    gen = torch.Generator().manual_seed(seed)
    targets = torch.randint(0, vocab, (rows,), generator=gen)
    targets[::4] = -100
    case = {
        "hidden": torch.randn(rows, dim, generator=gen),
        "weight": torch.randn(vocab, dim, generator=gen) * (3 / dim**0.5),
        "bias": torch.randn(vocab, generator=gen) if bias else None,
        "targets": targets,
        "coeff": torch.randn(rows, generator=gen),
    }
    cast = {"hidden", "weight", "bias"}
    return {name: None if t is None else t.to(device, dtype if name in cast else t.dtype)
            for name, t in case.items()}


def run(fn, case, dtype=None):
    """Forward and backward of ``sum(coeff * fn(...))``; leaves cast to ``dtype`` (default: the case's).
    Returns float32 ``logp`` and each gradient."""
    leaves = {name: case[name] for name in ("hidden", "weight", "bias") if case[name] is not None}
    leaves = {name: t.to(dtype or t.dtype).detach().requires_grad_() for name, t in leaves.items()}
    out = fn(leaves["hidden"], leaves["weight"], case["targets"], leaves.get("bias"))
    grads = torch.autograd.grad((out * case["coeff"]).sum(), list(leaves.values()))
    result = {"logp": out.detach().float()}
    result.update({f"grad_{name}": g.float() for name, g in zip(leaves, grads, strict=True)})
    return result


def rule_errors(fn, case, temperature):
    """``{name: (error, plain_error, floor)}`` for logp and every gradient (max abs errors)."""

    def ref(h, w, t, b, upcast):
        return token_logprobs_reference(h, w, t, b, temperature, upcast=upcast)

    reference = run(lambda h, w, t, b: ref(h, w, t, b, True), case, torch.float32)
    plain = run(lambda h, w, t, b: ref(h, w, t, b, False), case)
    got = run(fn, case)
    errors = {}
    for name, expected in reference.items():
        if not torch.isfinite(got[name]).all():
            raise AssertionError(f"{name} has NaN or inf")
        floor = 1e-5 * max(1.0, expected.abs().max().item())
        errors[name] = ((got[name] - expected).abs().max().item(),
                        (plain[name] - expected).abs().max().item(), floor)
    return errors


def assert_rule(errors):
    for name, (error, plain_error, floor) in errors.items():
        factor = 2 if name == "logp" else 3
        assert error <= factor * plain_error + floor, (
            f"{name}: error {error:.3g} > {factor} x plain-PyTorch error {plain_error:.3g} "
            f"+ floor {floor:.3g}")


def ignored_exactly(fn, case):
    """Ignored entries give log-prob 0 and gradient rows exactly 0."""
    got = run(fn, case)
    ignored = case["targets"] == -100
    return bool((got["logp"][ignored] == 0).all() and (got["grad_hidden"][ignored] == 0).all())


TORCH_CASES = [  # rows, dim, vocab, chunk_size (not dividing rows, or above it), bias, temperature
    (5, 123, 123, 2, False, 1.0),
    (37, 37, 1031, 16, True, 0.7),
    (40, 48, 500, 100, False, 2.0),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("rows,dim,vocab,chunk,bias,temperature", TORCH_CASES)
def test_torch_matches_reference(rows, dim, vocab, chunk, bias, temperature, dtype):
    case = make_case(rows, dim, vocab, dtype, bias=bias, seed=rows + vocab)

    def fn(h, w, t, b):
        return fused_token_logprobs(h, w, t, b, temperature=temperature, impl="torch", chunk_size=chunk)

    assert_rule(rule_errors(fn, case, temperature))
    assert ignored_exactly(fn, case)


def test_tied_weight_gets_both_gradients():
    """An LM head tied to the embedding: hidden is computed from weight, and weight has another loss term."""
    gen = torch.Generator().manual_seed(7)
    vocab, dim, rows = 211, 24, 13
    weight0 = torch.randn(vocab, dim, generator=gen) / dim**0.5
    ids = torch.randint(0, vocab, (rows,), generator=gen)
    targets = torch.randint(0, vocab, (rows,), generator=gen)
    targets[3] = -100
    noise = torch.randn(rows, dim, generator=gen)

    def grad_of(impl):
        weight = weight0.clone().requires_grad_()
        hidden = torch.tanh(3 * weight[ids] + noise)
        logp = fused_token_logprobs(hidden, weight, targets, temperature=0.9, impl=impl, chunk_size=4)
        (logp.sum() + 0.1 * (weight**2).sum()).backward()
        return weight.grad

    expected = grad_of("reference")
    assert (expected.abs() > 0).any()
    torch.testing.assert_close(grad_of("torch"), expected, rtol=0, atol=1e-5 * expected.abs().max().item())


def test_leading_batch_dims_and_empty_input():
    case = make_case(6, 20, 50, torch.float32, bias=True, seed=1)
    hidden, weight, targets, bias = case["hidden"], case["weight"], case["targets"], case["bias"]
    flat = fused_token_logprobs(hidden, weight, targets, bias, impl="torch")
    batched = fused_token_logprobs(hidden.view(2, 3, 20), weight, targets.view(2, 3), bias, impl="torch")
    assert batched.shape == (2, 3)
    assert torch.equal(batched.reshape(-1), flat)

    weight = weight.clone().requires_grad_()
    empty = fused_token_logprobs(hidden[:0], weight, targets[:0], impl="torch")
    assert empty.shape == (0,) and empty.dtype == torch.float32
    empty.sum().backward()
    assert torch.equal(weight.grad, torch.zeros_like(weight))


@pytest.mark.parametrize("impl", ["torch", "reference"])
def test_autocast_casts_an_fp32_head_like_linear(impl):
    case = make_case(7, 16, 40, torch.float32, bias=True, seed=4)
    hidden = case["hidden"].bfloat16()
    weight, bias = (case[name].clone().requires_grad_() for name in ("weight", "bias"))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logp = fused_token_logprobs(hidden, weight, case["targets"], bias, impl=impl)
        logp.sum().backward()
    expected = fused_token_logprobs(hidden, weight.bfloat16(), case["targets"], bias.bfloat16(), impl=impl)
    assert torch.equal(logp, expected)
    assert weight.grad.dtype == torch.float32 and weight.grad.abs().sum() > 0


def test_torch_compile_traces_the_op():
    case = make_case(9, 16, 70, torch.float32, bias=True, seed=2)

    def fn(h, w, t, b):
        return fused_token_logprobs(h, w, t, b, temperature=0.8, impl="torch", chunk_size=4)

    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
    eager, traced = run(fn, case), run(compiled, case)
    assert set(traced) == {"logp", *GRAD_NAMES}
    for name, value in eager.items():
        torch.testing.assert_close(traced[name], value, rtol=1e-6, atol=1e-6)


def test_auto_picks_torch_on_cpu_and_logs_once(caplog, monkeypatch):
    # with the native backend built, auto takes it instead (test_logprob_native.py)
    monkeypatch.setattr(native, "unavailable", lambda: "not built (simulated)")
    case = make_case(4, 8, 30, torch.float32, bias=False, seed=3)
    args = (case["hidden"], case["weight"], case["targets"])
    forget_choices()
    with caplog.at_level(logging.INFO, logger="fasteto.auto"):
        first = fused_token_logprobs(*args)
        fused_token_logprobs(*args)
    (message,) = [r.getMessage() for r in caplog.records]
    assert message.startswith("fused_token_logprobs impl (cpu): auto chose 'torch' (no native backend: ")
    assert torch.equal(first, fused_token_logprobs(*args, impl="torch"))


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="the interpreter runs CPU tensors")
def test_explicit_triton_on_cpu_raises():
    pytest.importorskip("triton")
    case = make_case(4, 8, 30, torch.float32, bias=False, seed=3)
    with pytest.raises(RuntimeError, match="Triton kernels need CUDA.*TRITON_INTERPRET=1.*impl='torch'"):
        fused_token_logprobs(case["hidden"], case["weight"], case["targets"], impl="triton")


def test_explicit_triton_without_triton_raises(monkeypatch):
    monkeypatch.setitem(sys.modules, "triton", None)  # makes `import triton` fail
    monkeypatch.delitem(sys.modules, "fasteto.ops.logprob.triton", raising=False)
    case = make_case(4, 8, 30, torch.float32, bias=False, seed=3)
    args = (case["hidden"], case["weight"], case["targets"])
    with pytest.raises(RuntimeError, match="triton is not importable.*pip install triton"):
        fused_token_logprobs(*args, impl="triton")
    assert fused_token_logprobs(*args).shape == (4,)  # auto on CPU never needs triton


def test_bad_inputs_raise_naming_the_problem():
    hidden, weight, targets = torch.randn(4, 8), torch.randn(10, 8), torch.tensor([1, 2, 3, -100])
    cases = [
        ((hidden, torch.randn(10, 9), targets), {}, ValueError,
         r"hidden.shape=\(4, 8\), weight.shape=\(10, 9\)"),
        ((hidden, weight, targets[:3]), {}, ValueError, r"hidden.shape=\(4, 8\), targets.shape=\(3,\)"),
        ((hidden, weight, targets, torch.randn(9)), {}, ValueError, r"bias.shape=\(9,\)"),
        ((hidden, weight, torch.tensor([1, 10, 3, 0])), {}, ValueError, r"\[0, 10\).*targets\[1\] = 10"),
        ((hidden, weight, torch.tensor([1, 2, -1, 0])), {}, ValueError, r"targets\[2\] = -1"),
        ((hidden.bfloat16(), weight, targets), {}, TypeError, "hidden torch.bfloat16, weight torch.float32"),
        ((hidden, weight, targets.int()), {}, TypeError, r"targets.long\(\)"),
        ((hidden, weight.to("meta"), targets), {}, ValueError, "weight is on meta but hidden is on cpu"),
        ((hidden, weight, targets), {"impl": "cuda"}, ValueError, "impl must be one of"),
        ((hidden, weight, targets), {"temperature": 0.0}, ValueError, "temperature"),
        ((hidden, weight, targets), {"ignore_index": 0}, ValueError, "ignore_index"),
        ((hidden, weight, targets), {"chunk_size": 0}, ValueError, "chunk_size"),
    ]
    for args, kwargs, error, pattern in cases:
        for impl in ("torch", "reference"):
            with pytest.raises(error, match=pattern):
                fused_token_logprobs(*args, **{"impl": impl, **kwargs})


# Tiny shapes for the interpreter (tiles there are 16 rows x 32 vocab x 16 dims): none is a multiple of
# a tile, and every one spans several tiles and two vocab splits.
INTERPRET_CASES = {
    "fp32-bias": dict(rows=20, dim=37, vocab=70, dtype="float32", bias=True, temperature=0.7),
    "fp32-small": dict(rows=5, dim=23, vocab=33, dtype="float32", bias=False, temperature=1.0),
    "bf16-bias": dict(rows=20, dim=37, vocab=70, dtype="bfloat16", bias=True, temperature=1.3),
    "bf16-small": dict(rows=5, dim=23, vocab=33, dtype="bfloat16", bias=False, temperature=1.0),
}


def interpreted_results():
    """Run every INTERPRET_CASES case through impl="triton" (this process must be interpreted)."""
    from fasteto.ops.logprob import triton as triton_backend

    assert triton_backend.INTERPRETED, "run with TRITON_INTERPRET=1 in the environment"
    results = {}
    for name, spec in INTERPRET_CASES.items():
        spec = dict(spec)
        temperature = spec.pop("temperature")
        case = make_case(**spec | {"dtype": getattr(torch, spec["dtype"])}, seed=len(name))

        def fn(h, w, t, b, temperature=temperature):
            return fused_token_logprobs(h, w, t, b, temperature=temperature, impl="triton")

        results[name] = {"errors": rule_errors(fn, case, temperature), "ignored": ignored_exactly(fn, case)}
    return results


@pytest.fixture(scope="module")
def interpreted():
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1",
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[2]),
                                          os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("name", list(INTERPRET_CASES))
def test_triton_interpreted_matches_reference(interpreted, name):
    assert_rule({key: tuple(value) for key, value in interpreted[name]["errors"].items()})
    assert interpreted[name]["ignored"]


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="needs the real compiler")
def test_triton_kernels_compile_for_hopper():
    """The interpreter is lenient; the real compiler (bundled with triton, no GPU needed) must accept the
    kernels with the launch configuration used on GPUs, within an H100's shared memory per block."""
    pytest.importorskip("triton")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from fasteto.ops.logprob import triton as backend

    blocks = backend._blocks()
    constexprs = {"HAS_BIAS": True, "BLOCK_M": blocks.m, "BLOCK_V": blocks.v, "BLOCK_D": blocks.d,
                  **backend._flags(torch.empty(0, dtype=torch.bfloat16))}
    for kernel in (backend._forward_kernel, backend._backward_kernel):
        signature = {}
        for name in kernel.arg_names:
            if name in constexprs:
                signature[name] = "constexpr"
            elif name in ("h_ptr", "w_ptr", "b_ptr"):
                signature[name] = "*bf16"
            elif name.endswith("_ptr"):
                signature[name] = "*i64" if name == "tgt_ptr" else "*fp32"
            else:
                signature[name] = "fp32" if name == "inv_temp" else "i32"
        source = ASTSource(fn=kernel, signature=signature,
                           constexprs={(kernel.arg_names.index(k),): v for k, v in constexprs.items()})
        compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32),
                                  options={"num_warps": blocks.num_warps})
        assert "ptx" in compiled.asm
        assert compiled.metadata.shared <= 227 * 1024, (kernel.fn.__name__, compiled.metadata.shared)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_triton_on_gpu_matches_reference_without_full_logits():
    rows, dim, vocab = 4096, 4096, 49152
    case = make_case(rows, dim, vocab, torch.bfloat16, bias=False, seed=11, device="cuda")

    def fn(h, w, t, b):
        return fused_token_logprobs(h, w, t, b, impl="triton")

    assert_rule(rule_errors(fn, case, 1.0))
    # Peak extra memory of forward + backward: the float32 grad accumulators, the cast grads and small
    # per-row vectors, nowhere near one float32 [rows, vocab] logits matrix on top.
    hidden, weight = (case[name].detach().requires_grad_() for name in ("hidden", "weight"))
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    logp = fn(hidden, weight, case["targets"], None)
    grads = torch.autograd.grad((logp * case["coeff"]).sum(), [hidden, weight])
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    assert all(torch.isfinite(g).all() for g in grads)
    accumulators = (rows + vocab) * dim * (4 + 2)
    assert extra < accumulators + (64 << 20), (
        f"peak extra {extra / 2**20:.0f} MiB, grad accumulators {accumulators / 2**20:.0f} MiB")


if __name__ == "__main__":
    print(json.dumps(interpreted_results()))


@pytest.mark.parametrize("impl", ["torch", "reference"])
def test_zero_width_hidden_gives_uniform_logprobs(impl):
    # D = 0: every logit is 0, so each target has log-prob -log V; leading dims are kept
    hidden, weight = torch.zeros(2, 3, 0, requires_grad=True), torch.zeros(5, 0, requires_grad=True)
    targets = torch.tensor([[0, 1, -100], [4, 2, 3]])
    out = fused_token_logprobs(hidden, weight, targets, impl=impl)
    expected = torch.full((2, 3), -torch.log(torch.tensor(5.0)).item()).masked_fill(targets < 0, 0.0)
    torch.testing.assert_close(out, expected)
    out.sum().backward()
    assert hidden.grad.shape == (2, 3, 0) and weight.grad.shape == (5, 0)
