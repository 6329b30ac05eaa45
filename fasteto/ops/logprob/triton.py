"""Fused log-probs in Triton: logits are only ever held as ``[BLOCK_M, BLOCK_V]`` tiles in registers.

Layers, top to bottom: private ``@triton.jit`` kernels, plain host launchers (``forward``, ``backward``).
The autograd wiring is ``api.py``'s ``torch.library`` registration, which calls the launchers.

- Forward: a program owns ``BLOCK_M`` rows and a contiguous range of vocab blocks (a *split*, so short
  inputs still fill the GPU). It streams the vocab with an online log-sum-exp and picks the target logit
  from the tile that holds it; splits are combined on the host (``[splits, M]`` floats). Only the
  per-row LSE is saved for backward.
- Backward: one program per ``(row block, vocab block)`` recomputes its logit tile, turns it into
  ``dlogits = g * (onehot - p) / T`` and adds ``dlogits @ W`` and ``dlogits^T @ h`` into float32
  ``grad_hidden`` / ``grad_weight`` buffers with atomics (the scheme of Apple's Cut Cross-Entropy,
  arXiv:2411.09009). No ``[M, V]`` buffer exists; the atomics make the summation order, and so the
  last bits of the gradients, vary from run to run.

Under ``TRITON_INTERPRET=1`` (CPU tests) half-precision tiles are upcast to float32 before ``tl.dot``:
the interpreter multiplies bfloat16 tiles as raw uint16 bit patterns (triton-lang/triton#11584). Products
of two bf16 numbers are exact in float32, so the results match the tensor-core path up to summation order.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction


@triton.jit
def _dot(a, b, acc, UPCAST: tl.constexpr, IEEE: tl.constexpr):
    # IEEE for float32 inputs: tl.dot would otherwise round them to TF32 on NVIDIA GPUs.
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    elif IEEE:
        return tl.dot(a, b, acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc)


@triton.jit
def _logit_tile(
    h_ptr, w_ptr, b_ptr, rows, cols, row_ok, col_ok, D, stride_hm, stride_hd, stride_wv, stride_wd,
    inv_temp, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr,
    BLOCK_D: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
):
    """``[BLOCK_M, BLOCK_V]`` float32 scaled logits; columns past the vocab are -inf."""
    acc = tl.zeros((BLOCK_M, BLOCK_V), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        dd = d0 + tl.arange(0, BLOCK_D)
        d_ok = dd < D
        h = tl.load(h_ptr + rows[:, None] * stride_hm + dd[None, :] * stride_hd,
                    mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        w = tl.load(w_ptr + cols[:, None] * stride_wv + dd[None, :] * stride_wd,
                    mask=col_ok[:, None] & d_ok[None, :], other=0.0)
        acc = _dot(h, tl.trans(w), acc, UPCAST, IEEE)
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    return tl.where(col_ok[None, :], acc * inv_temp, float("-inf"))


@triton.jit
def _forward_kernel(
    h_ptr, w_ptr, b_ptr, tgt_ptr, part_lse_ptr, part_tgt_ptr, M, V, D,
    stride_hm, stride_hd, stride_wv, stride_wd, inv_temp, BLOCKS_PER_SPLIT, NUM_V_BLOCKS,
    HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
    UPCAST: tl.constexpr, IEEE: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    tgt = tl.load(tgt_ptr + rows, mask=row_ok, other=-1)
    run_max = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    run_sum = tl.zeros((BLOCK_M,), dtype=tl.float32)
    tgt_logit = tl.zeros((BLOCK_M,), dtype=tl.float32)
    first = pid_s * BLOCKS_PER_SPLIT
    last = tl.minimum(first + BLOCKS_PER_SPLIT, NUM_V_BLOCKS)
    for vb in range(first, last):
        cols = vb * BLOCK_V + tl.arange(0, BLOCK_V)
        col_ok = cols < V
        z = _logit_tile(h_ptr, w_ptr, b_ptr, rows, cols, row_ok, col_ok, D, stride_hm, stride_hd,
                        stride_wv, stride_wd, inv_temp, HAS_BIAS, BLOCK_M, BLOCK_V, BLOCK_D, UPCAST, IEEE)
        # Every vocab block has at least one real column, so new_max is finite from the first block on.
        new_max = tl.maximum(run_max, tl.max(z, axis=1))
        run_sum = run_sum * tl.exp(run_max - new_max) + tl.sum(tl.exp(z - new_max[:, None]), axis=1)
        run_max = new_max
        tgt_logit += tl.sum(tl.where(cols[None, :] == tgt[:, None], z, 0.0), axis=1)
    out = pid_s * M + rows
    tl.store(part_lse_ptr + out, run_max + tl.log(run_sum), mask=row_ok)
    tl.store(part_tgt_ptr + out, tgt_logit, mask=row_ok)


@triton.jit
def _backward_kernel(
    h_ptr, w_ptr, b_ptr, tgt_ptr, lse_ptr, g_ptr, gh_ptr, gw_ptr, gb_ptr, M, V, D,
    stride_hm, stride_hd, stride_wv, stride_wd, inv_temp,
    HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
    UPCAST: tl.constexpr, IEEE: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_v = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    row_ok = rows < M
    col_ok = cols < V
    tgt = tl.load(tgt_ptr + rows, mask=row_ok, other=-1)
    lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
    # g is already zero on ignored rows and divided by the temperature (host side).
    g = tl.load(g_ptr + rows, mask=row_ok, other=0.0)
    z = _logit_tile(h_ptr, w_ptr, b_ptr, rows, cols, row_ok, col_ok, D, stride_hm, stride_hd,
                    stride_wv, stride_wd, inv_temp, HAS_BIAS, BLOCK_M, BLOCK_V, BLOCK_D, UPCAST, IEEE)
    onehot = (cols[None, :] == tgt[:, None]).to(tl.float32)
    dlogits = g[:, None] * (onehot - tl.exp(z - lse[:, None]))  # exp(-inf) = 0 past the vocab
    # Rows past M have lse = 0 and a bias-only logit whose exp may overflow: inf * 0 would be NaN.
    dlogits = tl.where(row_ok[:, None], dlogits, 0.0)
    if HAS_BIAS:
        tl.atomic_add(gb_ptr + cols, tl.sum(dlogits, axis=0), mask=col_ok)
    # Same rounding as plain same-dtype autograd: the logit gradient enters the GEMMs in the input dtype.
    dlogits = dlogits.to(h_ptr.dtype.element_ty)
    for d0 in range(0, D, BLOCK_D):
        dd = d0 + tl.arange(0, BLOCK_D)
        d_ok = dd < D
        h = tl.load(h_ptr + rows[:, None] * stride_hm + dd[None, :] * stride_hd,
                    mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        w = tl.load(w_ptr + cols[:, None] * stride_wv + dd[None, :] * stride_wd,
                    mask=col_ok[:, None] & d_ok[None, :], other=0.0)
        zero_h = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
        zero_w = tl.zeros((BLOCK_V, BLOCK_D), dtype=tl.float32)
        tl.atomic_add(gh_ptr + rows[:, None] * D + dd[None, :], _dot(dlogits, w, zero_h, UPCAST, IEEE),
                      mask=row_ok[:, None] & d_ok[None, :])
        tl.atomic_add(gw_ptr + cols[:, None] * D + dd[None, :],
                      _dot(tl.trans(dlogits), h, zero_w, UPCAST, IEEE), mask=col_ok[:, None] & d_ok[None, :])


# True when TRITON_INTERPRET=1 was set before this module was imported (kernels run on CPU tensors).
INTERPRETED = isinstance(_forward_kernel, InterpretedFunction)


@dataclass(frozen=True)
class _Blocks:
    m: int
    v: int
    d: int
    num_warps: int


def _blocks() -> _Blocks:
    # Tiny tiles under the interpreter so tiny test shapes still span several tiles in every dimension.
    return _Blocks(16, 32, 16, 1) if INTERPRETED else _Blocks(64, 128, 64, 8)


def _flags(hidden: torch.Tensor) -> dict:
    half = hidden.dtype != torch.float32
    return {"UPCAST": INTERPRETED and half, "IEEE": not half}


def _num_splits(num_m_blocks: int, num_v_blocks: int, device: torch.device) -> int:
    """Vocab splits per row block: enough programs for two waves over the GPU's SMs."""
    if INTERPRETED or device.type != "cuda":
        wanted = 2  # exercise the cross-split combine in CPU tests
    else:
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        wanted = triton.cdiv(2 * sms, num_m_blocks)
    return max(1, min(wanted, num_v_blocks))


def forward(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None,
    temperature: float,
    ignore_index: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Target log-probs and per-row log-sum-exp.

    Args:
        hidden: ``[M, D]`` float32/bf16/fp16. weight: ``[V, D]``, hidden's dtype. targets: ``[M]`` long,
            in ``[0, V)`` or ``ignore_index``. bias: ``[V]`` or None.

    Returns:
        ``logp`` ``[M]`` float32 (0 where ignored) and ``lse`` ``[M]`` float32 (of the scaled logits).
    """
    (rows, dim), vocab = hidden.shape, weight.shape[0]
    if rows == 0:
        empty = hidden.new_zeros(0, dtype=torch.float32)
        return empty, empty.clone()
    blk = _blocks()
    num_m, num_v = triton.cdiv(rows, blk.m), triton.cdiv(vocab, blk.v)
    per_split = triton.cdiv(num_v, _num_splits(num_m, num_v, hidden.device))
    splits = triton.cdiv(num_v, per_split)  # every split gets at least one vocab block
    part_lse = hidden.new_empty((splits, rows), dtype=torch.float32)
    part_tgt = torch.empty_like(part_lse)
    _forward_kernel[(num_m, splits)](
        hidden, weight, hidden if bias is None else bias, targets, part_lse, part_tgt, rows, vocab, dim,
        hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1), 1.0 / temperature,
        per_split, num_v, HAS_BIAS=bias is not None, BLOCK_M=blk.m, BLOCK_V=blk.v, BLOCK_D=blk.d,
        num_warps=blk.num_warps, **_flags(hidden),
    )
    lse = torch.logsumexp(part_lse, dim=0)
    logp = torch.where(targets != ignore_index, part_tgt.sum(0) - lse, 0.0)
    return logp, lse


def backward(
    grad_logp: torch.Tensor,
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None,
    lse: torch.Tensor,
    temperature: float,
    ignore_index: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Gradients of ``sum(grad_logp * logp)``.

    Args:
        grad_logp: ``[M]`` float32. lse: ``[M]`` float32 from ``forward``. Others as in ``forward``.

    Returns:
        ``grad_hidden`` ``[M, D]`` and ``grad_weight`` ``[V, D]`` in their inputs' dtypes, ``grad_bias``
        ``[V]`` (None without bias). Accumulated in float32.
    """
    (rows, dim), vocab = hidden.shape, weight.shape[0]
    grad_hidden = torch.zeros((rows, dim), dtype=torch.float32, device=hidden.device)
    grad_weight = torch.zeros((vocab, dim), dtype=torch.float32, device=weight.device)
    grad_bias = None if bias is None else torch.zeros(vocab, dtype=torch.float32, device=bias.device)
    if rows > 0:
        blk = _blocks()
        scaled = torch.where(targets != ignore_index, grad_logp.float(), 0.0) / temperature
        _backward_kernel[(triton.cdiv(rows, blk.m), triton.cdiv(vocab, blk.v))](
            hidden, weight, hidden if bias is None else bias, targets, lse, scaled,
            grad_hidden, grad_weight, grad_hidden if grad_bias is None else grad_bias, rows, vocab, dim,
            hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1), 1.0 / temperature,
            HAS_BIAS=bias is not None, BLOCK_M=blk.m, BLOCK_V=blk.v, BLOCK_D=blk.d,
            num_warps=blk.num_warps, **_flags(hidden),
        )
    grad_bias = None if grad_bias is None else grad_bias.to(bias.dtype)
    return grad_hidden.to(hidden.dtype), grad_weight.to(weight.dtype), grad_bias
