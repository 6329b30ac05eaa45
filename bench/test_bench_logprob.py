"""Fused per-token log-probs vs materialised logits, forward + backward: time and peak memory.

Contenders, side by side per shape. CPU: materialised, fused "torch" (chunked PyTorch) and fused
"native" (the C++ backend, kernels/cpu/); CUDA: materialised and fused "triton". Materialised is what a
plain trainer does (``fasteto.trainer.logprobs.token_logps``): ``hidden @ W.T`` in the inputs' dtype,
float32 ``log_softmax``, gather; on CPU float32 this is exactly the reference's arithmetic. All get the
same random upstream gradient. Each measurement appends a row (with its ``impl``) to
``bench/results/logprob.jsonl``; once a shape's last contender has run, one line gives every
contender's peak memory and median time and their ratios to the last one (materialised / native and
torch / native on CPU, materialised / triton on CUDA), printed at the end of the run. Nothing here
asserts on speed.
"""

from __future__ import annotations

import pytest
import torch
from _common import device_description, peak_memory, record_result

from fasteto.ops.logprob import fused_token_logprobs, native

# tokens, vocab, hidden dim, device, dtype. CPU sized to run in seconds; CUDA model-sized (SmolLM2/Qwen-like
# 49k vocab, Llama-3's 128k vocab, hidden 4096).
SHAPES = [
    (512, 8192, 256, "cpu", torch.float32),
    (1024, 49152, 256, "cpu", torch.float32),
    (1024, 49152, 256, "cpu", torch.bfloat16),
    (4096, 49152, 4096, "cuda", torch.bfloat16),
    (8192, 128256, 4096, "cuda", torch.bfloat16),
]
CONTENDERS = {"cpu": ("materialised", "torch", "native"), "cuda": ("materialised", "triton")}
CASES = [(shape, impl) for shape in SHAPES for impl in CONTENDERS[shape[3]]]


def case_id(shape, impl) -> str:
    tokens, vocab, _, device, dtype = shape
    return f"{tokens}x{vocab}-{device}-{str(dtype).removeprefix('torch.')}-{impl}"


def materialised(hidden, weight, targets):
    logits = (hidden @ weight.T).float()
    return torch.log_softmax(logits, dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)


def make_step(tokens, vocab, dim, device, dtype, impl):
    """A closure running one forward + backward of ``impl`` (synchronised on CUDA)."""
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(tokens, dim, generator=gen).to(device, dtype)
    weight = (torch.randn(vocab, dim, generator=gen) / dim**0.5).to(device, dtype)
    targets = torch.randint(0, vocab, (tokens,), generator=gen).to(device)
    coeff = torch.randn(tokens, generator=gen).to(device)

    def step():
        h, w = hidden.detach().requires_grad_(), weight.detach().requires_grad_()
        if impl == "materialised":
            logp = materialised(h, w, targets)
        else:
            logp = fused_token_logprobs(h, w, targets, impl=impl)
        grads = torch.autograd.grad((logp * coeff).sum(), (h, w))
        if device == "cuda":
            torch.cuda.synchronize()
        return grads

    return step


@pytest.mark.parametrize(("shape", "impl"), CASES, ids=[case_id(s, i) for s, i in CASES])
def test_logprob_forward_backward(benchmark, bench_report, shape, impl):
    tokens, vocab, dim, device, dtype = shape
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("CUDA shapes need a CUDA device")
    if impl == "native" and native.unavailable() is not None:
        pytest.skip(f"impl='native' cannot run: {native.unavailable()}")
    step = make_step(tokens, vocab, dim, device, dtype, impl)
    step()  # warm-up: Triton compilation, allocator growth
    peak_bytes, memory_method = peak_memory(step, device)
    benchmark.pedantic(step, rounds=5 if device == "cpu" else 10, iterations=1)
    stats = benchmark.stats.stats if benchmark.stats is not None else None  # None: --benchmark-disable
    row = record_result("logprob", {
        "bench": "logprob_forward_backward", "device": device_description(device), "tokens": tokens,
        "vocab": vocab, "dim": dim, "dtype": str(dtype).removeprefix("torch."),
        "kind": "materialised" if impl == "materialised" else "fused", "impl": impl,
        "native_build": native.build_info() if impl == "native" else None,
        "torch_threads": torch.get_num_threads(), "peak_bytes": peak_bytes, "memory_method": memory_method,
        "seconds_median": stats and stats.median, "seconds_min": stats and stats.min,
        "seconds_max": stats and stats.max,
        "rounds": stats and stats.rounds,
    })
    bench_report.rows[(shape, impl)] = row
    if impl == CONTENDERS[device][-1]:
        measured = [bench_report.rows[(shape, other)] for other in CONTENDERS[device]
                    if (shape, other) in bench_report.rows]
        bench_report.lines.append(comparison(measured))


def comparison(rows: list[dict]) -> str:
    """One line: each contender's peak memory and median time, and each other / the last one's ratio."""

    def ratio(a, b):
        return f"{a / b:.2f}x" if a and b else "n/a"

    def seconds(row):
        return "n/a" if row["seconds_median"] is None else f"{row['seconds_median']:.3f} s"

    mib, last, others = 2**20, rows[-1], rows[:-1]
    names = " / ".join(row["impl"] for row in rows)
    memory = " / ".join(f"{row['peak_bytes'] / mib:.0f} MiB" for row in rows)
    times = " / ".join(seconds(row) for row in rows)
    memory_ratios = ", ".join(f"{row['impl']}/{last['impl']} {ratio(row['peak_bytes'], last['peak_bytes'])}"
                              for row in others)
    time_ratios = ", ".join(f"{row['impl']}/{last['impl']} "
                            f"{ratio(row['seconds_median'], last['seconds_median'])}" for row in others)
    return (f"logprob {last['tokens']}x{last['vocab']} (D={last['dim']}, {last['dtype']}, {last['device']}), "
            f"{names}: peak memory {memory} ({memory_ratios}); median time {times} ({time_ratios})")
