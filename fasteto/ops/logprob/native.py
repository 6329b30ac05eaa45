"""The native C++ CPU backend (``kernels/cpu/token_logprobs.cpp``), loaded from ``fasteto/_native/``.

The library registers ``torch.ops.fasteto_native.token_logprobs`` and ``..._backward`` (CPU kernels,
float32 / bfloat16 / float16); this module finds and loads it once, registers their fake (meta)
implementations so ``torch.compile`` can trace a direct call, and exposes ``forward`` / ``backward`` with
``torch_chunked``'s signatures. The autograd wiring lives in ``api.py``.

Algorithm (details in the C++ file): the vocab in tiles shared out among the threads; each thread takes
each of its tiles through the rows, a chunk at a time, computing a ``[chunk, tile]`` float32 block of
logits with one MKL GEMM and reducing it while it is in cache (online log-sum-exp forward; softmax
gradient and two more GEMMs backward). Half-precision GEMMs multiply in bf16/fp16 and accumulate and
write float32, so unlike "torch" the logits are never rounded to the input dtype.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch

import fasteto

_LIBRARY_NAMES = ("libfasteto_native.so", "libfasteto_native.dylib", "fasteto_native.dll")
_REBUILD = ("reinstall with `pip install --no-build-isolation -e .` with cmake and a C++ compiler present "
            "(and torch installed first); or pass impl='torch'")


def library_candidates() -> list[Path]:
    """Where the library may be: ``_native/`` under each of ``fasteto.__path__`` (an editable install
    lists both the source tree and the install tree there)."""
    return [Path(root) / "_native" / name for root in fasteto.__path__ for name in _LIBRARY_NAMES]


@torch.compiler.assume_constant_result  # torch.compile runs it once, as Python, and keeps the answer
def unavailable() -> str | None:
    """Why the native backend cannot run, or None when it can (loads the library on first call)."""
    return _load(tuple(library_candidates()))


@functools.cache
def _load(candidates: tuple[Path, ...]) -> str | None:
    """Load the first library found among ``candidates``; None when its ops are usable, else why not."""
    found = next((path for path in candidates if path.is_file()), None)
    if found is None:
        searched = ", ".join(dict.fromkeys(str(path.parent) for path in candidates))
        return f"the native library is not built (looked in {searched}); {_REBUILD}"
    try:
        torch.ops.load_library(str(found))
    except (OSError, RuntimeError) as error:
        return f"loading {found} failed ({error}); {_REBUILD}"
    _register_fakes()
    return torch.ops.fasteto_native.missing() or None


def build_info() -> str:
    """The GEMM and SIMD paths the library uses, e.g. ``"gemm=mkl (...) simd=avx512 openmp=yes"``."""
    reason = unavailable()
    if reason is not None:
        raise RuntimeError(f"impl='native' cannot run: {reason}")
    return torch.ops.fasteto_native.build_info()


@functools.cache  # once per process: a second registration would raise
def _register_fakes() -> None:
    @torch.library.register_fake("fasteto_native::token_logprobs")
    def _(hidden, weight, targets, bias, temperature, ignore_index, chunk_rows):
        rows = hidden.shape[0]
        return hidden.new_empty(rows, dtype=torch.float32), hidden.new_empty(rows, dtype=torch.float32)

    @torch.library.register_fake("fasteto_native::token_logprobs_backward")
    def _(grad_logp, hidden, weight, targets, bias, lse, temperature, ignore_index, chunk_rows):
        grad_bias = hidden.new_empty(0) if bias is None else torch.empty_like(bias)
        return torch.empty_like(hidden), torch.empty_like(weight), grad_bias

    @torch.library.register_fake("fasteto_native::decode_attention")  # kernels/cpu/decode_attention.cpp
    def _(query, keys, values, slots, lengths, scale):
        return torch.empty_like(query, memory_format=torch.contiguous_format)


def _ops():
    reason = unavailable()
    if reason is not None:
        raise RuntimeError(f"impl='native' cannot run: {reason}")
    return torch.ops.fasteto_native


def forward(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None,
    temperature: float,
    ignore_index: int,
    chunk_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Target log-probs and per-row log-sum-exp.

    Args:
        hidden: ``[M, D]`` float32, bfloat16 or float16 on CPU. weight: ``[V, D]``, hidden's dtype.
            targets: ``[M]`` long, in ``[0, V)`` or ``ignore_index``. bias: ``[V]`` or None.
            chunk_size: rows per pass over the vocab (None: all rows, unless each thread's float32
            ``[pass, D]`` grad_hidden would exceed 8 MiB).

    Returns:
        ``logp`` ``[M]`` float32 (0 where ignored) and ``lse`` ``[M]`` float32 (of the scaled logits).
    """
    return _ops().token_logprobs(hidden, weight, targets, bias, float(temperature), int(ignore_index),
                                 int(chunk_size or 0))


def backward(
    grad_logp: torch.Tensor,
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None,
    lse: torch.Tensor,
    temperature: float,
    ignore_index: int,
    chunk_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Gradients of ``sum(grad_logp * logp)``.

    Args:
        grad_logp: ``[M]`` float32. lse: ``[M]`` float32 from ``forward``. Others as in ``forward``.

    Returns:
        ``grad_hidden`` ``[M, D]`` and ``grad_weight`` ``[V, D]`` in their inputs' dtypes (accumulated in
        float32), ``grad_bias`` ``[V]`` (None without bias).
    """
    grad_hidden, grad_weight, grad_bias = _ops().token_logprobs_backward(
        grad_logp.float(), hidden, weight, targets, bias, lse, float(temperature), int(ignore_index),
        int(chunk_size or 0))
    return grad_hidden, grad_weight, None if bias is None else grad_bias
