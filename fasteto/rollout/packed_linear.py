"""The continuous engine's linear layers on weights packed once for oneDNN (CPU).

A decode step multiplies a few rows (one token per decoding row) by every weight matrix, so it is bound
by reading the weights. ``F.linear`` on the CPU re-lays the weight out for its GEMM on every call;
``torch.ops.mkldnn._reorder_linear_weight`` does that once, and ``_linear_pointwise`` then reads the
packed copy. On a 2-core AMD EPYC (AVX-512 BF16), SmolLM2's weight shapes at 8 rows: bf16 20.7 → 30.1
GB/s, float32 12.1 → 28.1 GB/s (a probe, not a bench row; the bench measures the whole engine).

- bf16: the packed product is bit-identical to ``F.linear``'s (both are oneDNN; tests check
  ``torch.equal``), so ``auto`` takes it.
- float32: ``F.linear`` runs MKL's sgemm and oneDNN's sums differ in the last bits, so float32 greedy
  replies could differ from the plain engine's. ``auto`` keeps ``torch`` there; ``onednn`` must be asked
  for.

Memory: one packed copy of every ``nn.Linear`` weight (the model's own stays, it may be shared).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from functools import partial

import torch
from torch import nn

from fasteto.utils.choices import record_choice

LINEAR_IMPLS = ("auto", "onednn", "torch")


def unavailable(dtype: torch.dtype, device: torch.device) -> str | None:
    """Why packed oneDNN linears cannot run for these weights, or None."""
    if device.type != "cpu":
        return f"it runs on the CPU only (weights on {device.type})"
    if not torch.backends.mkldnn.is_available() or not hasattr(torch.ops.mkldnn, "_reorder_linear_weight"):
        return f"this torch ({torch.__version__}) has no oneDNN linear ops"
    if dtype not in (torch.bfloat16, torch.float32):
        return f"weights in {dtype} (oneDNN packing takes bfloat16 or float32)"
    return None


def resolve(impl: str, dtype: torch.dtype, device: torch.device) -> str:
    """``onednn`` or ``torch`` for ``impl`` with weights of ``dtype`` on ``device``. ``auto`` takes
    ``onednn`` for bf16 on the CPU (bit-identical) and records why; an explicit ``onednn`` that cannot
    run raises with the reason."""
    if impl not in LINEAR_IMPLS:
        raise ValueError(f"linear impl must be one of {', '.join(LINEAR_IMPLS)}; got {impl!r}")
    if impl == "torch":
        return impl
    reason = unavailable(dtype, device)
    if impl == "onednn":
        if reason is not None:
            raise RuntimeError(f"linear impl='onednn' cannot run: {reason}")
        return impl
    if reason is None and dtype != torch.bfloat16:
        reason = (f"{str(dtype).removeprefix('torch.')} weights: oneDNN's sums differ from F.linear's in the "
                  "last bits, and float32 greedy replies stay token-identical to the plain engine's")
    chosen = "onednn" if reason is None else "torch"
    why = "bf16 weights on the CPU: packed once, bit-identical to F.linear" if reason is None else reason
    record_choice(f"explore.linear ({device.type})", chosen, why)
    return chosen


class PackedLinears:
    """Packed copies of every ``nn.Linear`` weight ``[N, K]`` of ``model`` (subclasses, e.g. LoRA
    wrappers, are left alone), for inputs of about ``rows`` rows (oneDNN's layout hint; any row count
    works). Pack again after the weights change."""

    def __init__(self, model: nn.Module, rows: int):
        self.weights = {module: pack(module.weight.detach(), rows)
                        for module in model.modules() if type(module) is nn.Linear}
        self._forwards = {module: partial(_linear, packed, module.bias)
                          for module, packed in self.weights.items()}

    @contextlib.contextmanager
    def routed(self) -> Iterator[None]:
        """Inside the block those modules' forwards read the packed weights; restored after, also on
        error."""
        try:
            for module, forward in self._forwards.items():  # made once: this runs every decode step
                module.forward = forward
            yield
        finally:
            for module in self.weights:
                module.__dict__.pop("forward", None)


def pack(weight: torch.Tensor, rows: int) -> torch.Tensor:
    """``weight`` ``[N, K]`` laid out once for oneDNN products with about ``rows`` rows."""
    return torch.ops.mkldnn._reorder_linear_weight(weight, rows)


def linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x [..., K] @ W.T + bias`` → ``[..., N]`` with ``W`` packed by ``pack``."""
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


def _linear(packed: torch.Tensor, bias: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    return linear(x, packed, bias)
