"""``fused_token_logprobs``: per-token log-probs from hidden states and the LM head, forward and backward,
without materialising the ``[tokens, vocab]`` logits.

The op is registered with ``torch.library`` (``fasteto::token_logprobs`` and its backward
``fasteto::token_logprobs_backward``), so ``torch.compile`` traces it as one opaque node; the autograd
rule is ``register_autograd`` on the forward op. Both ops take the resolved backend name and dispatch to
that backend's host functions (``torch_chunked.py``, ``native.py``, ``triton.py``); the backends never
import each other or the reference.
"""

from __future__ import annotations

import importlib
import math
from types import ModuleType

import torch

from fasteto.ops.logprob import native, torch_chunked
from fasteto.ops.logprob.reference import token_logprobs_reference
from fasteto.utils.choices import record_choice

IMPLS = ("auto", "triton", "torch", "native", "reference")
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def fused_token_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    temperature: float = 1.0,
    ignore_index: int = -100,
    impl: str = "auto",
    chunk_size: int | None = None,
) -> torch.Tensor:
    """``log_softmax((hidden @ weight.T + bias) / temperature)[..., targets]``, differentiable in hidden,
    weight and bias. The temperature divides the whole logit, bias included (as sampling does).

    Args:
        hidden: ``[..., D]`` float32, bfloat16 or float16 (e.g. ``hidden[batch.logp_rows]``, ``[M, D]``).
        weight: ``[V, D]``, hidden's dtype and device (the LM head; may be tied to the embedding).
        targets: ``[...]`` long (hidden's leading shape), each in ``[0, V)`` or ``ignore_index``.
        bias: ``[V]``, hidden's dtype, or None.
        temperature: > 0. ignore_index: a negative id; those entries give log-prob 0 and no gradient.
        impl: ``"triton"`` (CUDA, or CPU under ``TRITON_INTERPRET=1``), ``"torch"`` (chunked PyTorch),
            ``"native"`` (the C++ CPU backend in ``kernels/cpu/``, built by ``pip install
            --no-build-isolation -e .``), ``"reference"`` (materialised float32 logits), or ``"auto"``:
            for CUDA tensors triton when triton imports, else torch; for CPU tensors native when its
            library is built (it beats "torch" at every shape of ``bench/test_bench_logprob.py``), else
            torch. The choice is recorded and logged once (``fasteto.utils.choices``). An explicit impl
            that cannot run raises with the reason.
        chunk_size: rows per chunk for ``impl="torch"`` (default: one ~32 MiB float32 ``[chunk, V]``
            block) and rows per pass over the vocab for ``impl="native"`` (default: all rows, unless each
            thread's float32 ``[pass, D]`` grad_hidden would exceed 8 MiB); the other impls ignore it.

    Returns:
        ``[...]`` float32 log-probs. GEMMs accumulate in float32 and the softmax is float32; triton keeps
        the logits in float32 (float32 inputs use IEEE, not TF32, ``tl.dot``), and so does "native" (its
        bf16/fp16 GEMMs write float32), while "torch" rounds bf16/fp16 logits to the input dtype after the
        GEMM, as plain PyTorch does. Checking the targets' range reads them on the host (one device sync
        per call).

    Under ``torch.autocast`` the float inputs are first cast to the autocast dtype (as ``F.linear`` would),
    so an fp32 LM head works with bf16 hidden states; the gradient reaches the fp32 weight in fp32.
    """
    hidden, weight, bias = _autocast_inputs(hidden, weight, bias)
    _check_inputs(hidden, weight, targets, bias)
    _check_options(temperature, ignore_index, chunk_size)
    backend = _resolve_impl(impl, hidden.device)
    flat_hidden = hidden.reshape(targets.numel(), hidden.shape[-1])  # not -1: D may be 0
    flat_targets = targets.reshape(-1).contiguous()
    if backend == "reference":
        _check_target_values(flat_targets, weight.shape[0], ignore_index)
        with torch.autocast(hidden.device.type, enabled=False):
            logp = token_logprobs_reference(flat_hidden, weight, flat_targets, bias, temperature,
                                            ignore_index)
    else:
        logp, _ = torch.ops.fasteto.token_logprobs(
            flat_hidden, weight, flat_targets, bias, float(temperature), int(ignore_index), backend,
            int(chunk_size or 0),
        )
    return logp.reshape(targets.shape)


def _autocast_inputs(hidden, weight, bias):
    device_type = hidden.device.type
    if not (torch.is_autocast_enabled(device_type) and hidden.is_floating_point()):
        return hidden, weight, bias
    dtype = torch.get_autocast_dtype(device_type)
    return hidden.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype)


def _check_inputs(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, bias: torch.Tensor | None
) -> None:
    if hidden.dtype not in _DTYPES:
        raise TypeError(f"hidden must be float32, bfloat16 or float16, got {hidden.dtype}")
    if weight.dtype != hidden.dtype or (bias is not None and bias.dtype != hidden.dtype):
        got = f"hidden {hidden.dtype}, weight {weight.dtype}"
        got += "" if bias is None else f", bias {bias.dtype}"
        raise TypeError(f"hidden, weight and bias must share one dtype, got {got}; cast weight (and bias) "
                        "to hidden's dtype")
    if targets.dtype != torch.long:
        raise TypeError(f"targets must be torch.long, got {targets.dtype}; pass targets.long()")
    if hidden.dim() < 1 or weight.dim() != 2 or hidden.shape[-1] != weight.shape[1] or weight.shape[0] == 0:
        raise ValueError(f"hidden must be [..., D] and weight [V, D] with V >= 1: "
                         f"hidden.shape={tuple(hidden.shape)}, weight.shape={tuple(weight.shape)}")
    if targets.shape != hidden.shape[:-1]:
        raise ValueError(f"targets must have hidden's leading shape: hidden.shape={tuple(hidden.shape)}, "
                         f"targets.shape={tuple(targets.shape)}")
    if bias is not None and bias.shape != weight.shape[:1]:
        raise ValueError(f"bias must be [V]: weight.shape={tuple(weight.shape)}, "
                         f"bias.shape={tuple(bias.shape)}")
    named = {"weight": weight, "targets": targets} | ({} if bias is None else {"bias": bias})
    for name, tensor in named.items():
        if tensor.device != hidden.device:
            raise ValueError(f"{name} is on {tensor.device} but hidden is on {hidden.device}; move them to "
                             "one device")


def _check_options(temperature: float, ignore_index: int, chunk_size: int | None) -> None:
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    if not isinstance(ignore_index, int) or ignore_index >= 0:
        raise ValueError(f"ignore_index must be a negative int (a vocab id would be ambiguous), "
                         f"got {ignore_index!r}")
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size <= 0):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")


def _check_target_values(targets: torch.Tensor, vocab_size: int, ignore_index: int) -> None:
    """Reads the targets on the host (one device sync); out-of-range ids would otherwise give garbage."""
    bad = (targets != ignore_index) & ((targets < 0) | (targets >= vocab_size))
    if bool(bad.any()):
        where = int(bad.nonzero()[0, 0])
        raise ValueError(f"targets must be in [0, {vocab_size}) or ignore_index={ignore_index}; "
                         f"targets[{where}] = {int(targets[where])} (flattened index)")


def _resolve_impl(impl: str, device: torch.device) -> str:
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl in ("triton", "native"):
        reason = _triton_unavailable(device) if impl == "triton" else _native_unavailable(device)
        if reason is not None:
            raise RuntimeError(f"impl={impl!r} cannot run: {reason}")
    if impl != "auto":
        return impl
    if device.type == "cuda":
        reason = _triton_unavailable(device)
        choice, why = ("triton", "triton imports") if reason is None else ("torch", f"no triton: {reason}")
    else:
        reason = _native_unavailable(device)
        choice, why = ("native", "the native C++ library is built") if reason is None else \
            ("torch", f"no native backend: {reason}")
    record_choice(f"fused_token_logprobs impl ({device.type})", choice, why)
    return choice


def _native_unavailable(device: torch.device) -> str | None:
    """Why the native C++ backend cannot run on ``device``, or None when it can."""
    if device.type != "cpu":
        return (f"the tensors are on {device} and the native backend is CPU-only; pass impl='triton' or "
                "impl='torch'")
    return native.unavailable()


def _triton_unavailable(device: torch.device) -> str | None:
    """Why the Triton backend cannot run on ``device``, or None when it can."""
    try:
        backend = _triton_backend()
    except ImportError as error:
        return (f"triton is not importable ({error}); install it (`pip install triton`, or the "
                "fasteto[gpu] extra) or pass impl='torch'")
    if device.type != "cuda" and not backend.INTERPRETED:
        return (f"the tensors are on {device} and Triton kernels need CUDA; to run them on CPU set "
                "TRITON_INTERPRET=1 in the environment before Python starts, or pass impl='torch'")
    return None


def _triton_backend() -> ModuleType:
    # Imported on first use: CPU-only callers never pay for (or need) triton.
    return importlib.import_module("fasteto.ops.logprob.triton")


def _backend_forward(impl, hidden, weight, targets, bias, temperature, ignore_index, chunk_size):
    if impl in ("torch", "native"):
        backend = torch_chunked if impl == "torch" else native
        return backend.forward(hidden, weight, targets, bias, temperature, ignore_index, chunk_size or None)
    return _triton_backend().forward(hidden, weight, targets, bias, temperature, ignore_index)


def _backend_backward(impl, grad, hidden, weight, targets, bias, lse, temperature, ignore_index, chunk_size):
    if impl in ("torch", "native"):
        backend = torch_chunked if impl == "torch" else native
        return backend.backward(grad, hidden, weight, targets, bias, lse, temperature, ignore_index,
                                chunk_size or None)
    return _triton_backend().backward(grad, hidden, weight, targets, bias, lse, temperature, ignore_index)


@torch.library.custom_op("fasteto::token_logprobs", mutates_args=())
def _token_logprobs_op(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None,
    temperature: float,
    ignore_index: int,
    impl: str,
    chunk_size: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``[M, D], [V, D], [M], [V]? -> logp [M] float32, lse [M] float32``; ``impl``: "torch", "native" or
    "triton", ``chunk_size``: 0 for the default."""
    _check_target_values(targets, weight.shape[0], ignore_index)
    # The backends choose their own precisions; an enclosing autocast must not recast their GEMMs.
    with torch.autocast(hidden.device.type, enabled=False):
        return _backend_forward(impl, hidden, weight, targets, bias, temperature, ignore_index, chunk_size)


@_token_logprobs_op.register_fake
def _(hidden, weight, targets, bias, temperature, ignore_index, impl, chunk_size):
    rows = hidden.shape[0]
    return hidden.new_empty(rows, dtype=torch.float32), hidden.new_empty(rows, dtype=torch.float32)


@torch.library.custom_op("fasteto::token_logprobs_backward", mutates_args=())
def _token_logprobs_backward_op(
    grad_logp: torch.Tensor,
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None,
    lse: torch.Tensor,
    temperature: float,
    ignore_index: int,
    impl: str,
    chunk_size: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``-> grad_hidden [M, D], grad_weight [V, D], grad_bias [V]`` (``[0]`` without bias), input dtypes."""
    with torch.autocast(hidden.device.type, enabled=False):
        grad_hidden, grad_weight, grad_bias = _backend_backward(
            impl, grad_logp, hidden, weight, targets, bias, lse, temperature, ignore_index, chunk_size)
    return grad_hidden, grad_weight, hidden.new_empty(0) if grad_bias is None else grad_bias


@_token_logprobs_backward_op.register_fake
def _(grad_logp, hidden, weight, targets, bias, lse, temperature, ignore_index, impl, chunk_size):
    grad_bias = hidden.new_empty(0) if bias is None else torch.empty_like(bias)
    return torch.empty_like(hidden), torch.empty_like(weight), grad_bias


def _setup_context(ctx, inputs, output) -> None:
    hidden, weight, targets, bias, temperature, ignore_index, impl, chunk_size = inputs
    ctx.save_for_backward(hidden, weight, targets, bias, output[1])
    ctx.options = (temperature, ignore_index, impl, chunk_size)


def _backward(ctx, grad_logp, _grad_lse):
    # lse is an output only so that it can be saved; fused_token_logprobs never returns it.
    hidden, weight, targets, bias, lse = ctx.saved_tensors
    grad_hidden, grad_weight, grad_bias = torch.ops.fasteto.token_logprobs_backward(
        grad_logp.contiguous(), hidden, weight, targets, bias, lse, *ctx.options
    )
    return grad_hidden, grad_weight, None, (None if bias is None else grad_bias), None, None, None, None


_token_logprobs_op.register_autograd(_backward, setup_context=_setup_context)
