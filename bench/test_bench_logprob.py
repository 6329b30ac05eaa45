"""Fused per-token log-probs vs materialised logits, forward + backward: time and peak memory.

Fused: ``fused_token_logprobs`` with impl "torch" (CPU) or "triton" (CUDA). Materialised: what a plain
trainer does (``fasteto.trainer.logprobs.token_logps``): ``hidden @ W.T`` in the inputs' dtype, float32
``log_softmax``, gather; on CPU float32 this is exactly the reference's arithmetic. Both get the same
random upstream gradient. Each measurement appends a row to ``bench/results/logprob.jsonl``; the memory
and time ratios (materialised / fused) are printed at the end of the run. Nothing here asserts on speed.
"""

from __future__ import annotations

import pytest
import torch
from _common import device_description, peak_memory, record_result

from fasteto.ops.logprob import fused_token_logprobs

# tokens, vocab, hidden dim, device. CPU float32, sized to run in seconds; CUDA bfloat16, model-sized
# (SmolLM2/Qwen-like 49k vocab, Llama-3's 128k vocab, hidden 4096).
SHAPES = [
    (512, 8192, 256, "cpu"),
    (1024, 49152, 256, "cpu"),
    (4096, 49152, 4096, "cuda"),
    (8192, 128256, 4096, "cuda"),
]
CASES = [(shape, kind) for shape in SHAPES for kind in ("materialised", "fused")]


def materialised(hidden, weight, targets):
    logits = (hidden @ weight.T).float()
    return torch.log_softmax(logits, dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)


def make_step(tokens, vocab, dim, device, kind):
    """A closure running one forward + backward (synchronised on CUDA), and the impl it measures."""
    gen = torch.Generator().manual_seed(0)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    hidden = torch.randn(tokens, dim, generator=gen).to(device, dtype)
    weight = (torch.randn(vocab, dim, generator=gen) / dim**0.5).to(device, dtype)
    targets = torch.randint(0, vocab, (tokens,), generator=gen).to(device)
    coeff = torch.randn(tokens, generator=gen).to(device)
    impl = "materialised" if kind == "materialised" else ("triton" if device == "cuda" else "torch")

    def step():
        h, w = hidden.detach().requires_grad_(), weight.detach().requires_grad_()
        if kind == "materialised":
            logp = materialised(h, w, targets)
        else:
            logp = fused_token_logprobs(h, w, targets, impl=impl)
        grads = torch.autograd.grad((logp * coeff).sum(), (h, w))
        if device == "cuda":
            torch.cuda.synchronize()
        return grads

    return step, impl, dtype


@pytest.mark.parametrize(("shape", "kind"), CASES, ids=[f"{s[0]}x{s[1]}-{s[3]}-{k}" for s, k in CASES])
def test_logprob_forward_backward(benchmark, bench_report, shape, kind):
    tokens, vocab, dim, device = shape
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("CUDA shapes need a CUDA device")
    step, impl, dtype = make_step(tokens, vocab, dim, device, kind)
    step()  # warm-up: Triton compilation, allocator growth
    peak_bytes, memory_method = peak_memory(step, device)
    benchmark.pedantic(step, rounds=3 if device == "cpu" else 10, iterations=1)
    stats = benchmark.stats.stats if benchmark.stats is not None else None  # None: --benchmark-disable
    row = record_result("logprob", {
        "bench": "logprob_forward_backward", "device": device_description(device), "tokens": tokens,
        "vocab": vocab, "dim": dim, "dtype": str(dtype).removeprefix("torch."), "kind": kind, "impl": impl,
        "torch_threads": torch.get_num_threads(), "peak_bytes": peak_bytes, "memory_method": memory_method,
        "seconds_median": stats and stats.median, "seconds_min": stats and stats.min,
        "rounds": stats and stats.rounds,
    })
    bench_report.rows[(shape, kind)] = row
    baseline = bench_report.rows.get((shape, "materialised"))
    if kind == "fused" and baseline is not None:
        bench_report.lines.append(comparison(baseline, row))


def comparison(baseline: dict, fused: dict) -> str:
    """One line: peak memory and median time of both, and materialised / fused ratios."""

    def ratio(a, b):
        return f"{a / b:.2f}x" if a and b else "n/a"

    def seconds(row):
        return "n/a" if row["seconds_median"] is None else f"{row['seconds_median']:.3f} s"

    mib = 2**20
    return (f"logprob {fused['tokens']}x{fused['vocab']} (D={fused['dim']}, {fused['dtype']}, "
            f"{fused['device']}): peak memory {baseline['peak_bytes'] / mib:.0f} MiB materialised / "
            f"{fused['peak_bytes'] / mib:.0f} MiB {fused['impl']} = "
            f"{ratio(baseline['peak_bytes'], fused['peak_bytes'])}; median time {seconds(baseline)} / "
            f"{seconds(fused)} = {ratio(baseline['seconds_median'], fused['seconds_median'])}")
