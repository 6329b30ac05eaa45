"""A lean forward of Llama-family models for the continuous engine's packed steps.

A decode step of SmolLM2-135M on 8 rows spends about a third of its time outside the kernels: Hugging
Face's per-module calls, keyword plumbing and the attention interface, over 30 layers (a profile on the
AMD EPYC: 30 ms a step, 22 ms of it in ops). ``LeanLlama`` runs the same arithmetic with plain tensor
calls over weights gathered once per policy:

- q, k and v are one matmul over their concatenated weights, and so are gate and up; with the
  ``onednn`` linears those weights are packed once (``fasteto.rollout.packed_linear``);
- RMSNorm, RoPE, SiLU and the residuals are Hugging Face's formulas, op for op, in the same dtypes;
- attention and the KV writes are the slot attention's (``fasteto.rollout.slot_kv``).

On the AMD EPYC the concatenated products equal the separate ones bit for bit (both dtypes, both linear
impls); tests check the logits against the model's own forward. ``auto`` takes the lean forward where the
linears are already not ``F.linear`` (``onednn``), so the exact float32 path stays the model's own.

Supported: ``model_type`` llama (SmolLM2, Llama 2 and 3), SiLU, no biases, RoPE types whose frequencies
are fixed (not ``dynamic`` or ``longrope``), plain ``nn.Linear`` projections (no LoRA wrappers: merge
them first, as the explorer's policies are).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fasteto.rollout import packed_linear
from fasteto.rollout.slot_kv import PackedStep, slot_attend
from fasteto.utils.choices import record_choice

FORWARD_IMPLS = ("auto", "hf", "lean")
PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
               "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def unsupported(model: nn.Module) -> str | None:
    """Why ``LeanLlama`` cannot run ``model``, or None."""
    config = model.config
    if getattr(config, "model_type", None) != "llama":
        return f"model_type {getattr(config, 'model_type', None)!r} (the lean forward runs llama)"
    if config.hidden_act != "silu":
        return f"hidden_act {config.hidden_act!r} (the lean forward runs silu)"
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        return "projection biases (the lean forward runs none)"
    if getattr(config, "pretraining_tp", 1) != 1:
        return f"pretraining_tp {config.pretraining_tp}"
    rope = getattr(model.model.rotary_emb, "rope_type", "default")
    if rope in ("dynamic", "longrope"):
        return f"RoPE type {rope!r} changes its frequencies with the length"
    linears = {f"layers.{i}.{name}": layer.get_submodule(name)
               for i, layer in enumerate(model.model.layers) for name in PROJECTIONS}
    for name, module in {**linears, "lm_head": model.lm_head}.items():
        if type(module) is not nn.Linear:
            return f"{name} is a {type(module).__name__}, not a plain nn.Linear (merge adapters first)"
    return None


def resolve(impl: str, model: nn.Module, linear: str) -> str:
    """``hf`` or ``lean`` for ``impl``. ``auto`` takes ``lean`` for a supported model with ``onednn``
    linears, and records why; an explicit ``lean`` that cannot run raises with the reason."""
    if impl not in FORWARD_IMPLS:
        raise ValueError(f"forward impl must be one of {', '.join(FORWARD_IMPLS)}; got {impl!r}")
    reason = unsupported(model)
    if impl == "lean" and reason is not None:
        raise RuntimeError(f"forward impl 'lean' (--explore.forward lean) cannot run: {reason}; pass hf or "
                           "auto")
    if impl != "auto":
        return impl
    if reason is None and linear != "onednn":
        reason = "F.linear keeps the model's own forward, token-identical to the plain engine"
    chosen = "hf" if reason else "lean"
    record_choice("explore.forward", chosen, reason or "a llama model with packed oneDNN linears")
    return chosen


class LeanLlama:
    """The weights of a Llama ``model`` gathered for packed steps (``onednn``: packed for about ``rows``
    rows). Memory: ``onednn``, one packed copy of the decoder's and the head's weights; ``F.linear``, a
    copy of the concatenated q/k/v and gate/up weights only. Gather again after the weights change."""

    def __init__(self, model: nn.Module, rows: int, onednn: bool):
        config, body = model.config, model.model
        self.heads, self.kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.heads
        self.scaling = self.head_dim ** -0.5
        self.eps = config.rms_norm_eps
        self.inv_freq = body.rotary_emb.inv_freq.float()
        self.rope_scale = body.rotary_emb.attention_scaling
        self.linear = packed_linear.linear if onednn else F.linear

        def weight(*modules: nn.Linear) -> torch.Tensor:
            weights = [m.weight.detach() for m in modules]
            joined = torch.cat(weights) if len(weights) > 1 else weights[0]
            return packed_linear.pack(joined, rows) if onednn else joined

        self.layers = []
        for layer in body.layers:
            attn, mlp = layer.self_attn, layer.mlp
            self.layers.append((layer.input_layernorm.weight.detach(),
                                weight(attn.q_proj, attn.k_proj, attn.v_proj), weight(attn.o_proj),
                                layer.post_attention_layernorm.weight.detach(),
                                weight(mlp.gate_proj, mlp.up_proj), weight(mlp.down_proj)))
        self.norm = body.norm.weight.detach()
        self.embed = body.embed_tokens.weight.detach()
        self.head = weight(model.lm_head)

    @torch.no_grad()
    def __call__(self, ids: torch.Tensor, step: PackedStep) -> torch.Tensor:
        """Logits ``[R, V]`` at each segment's last token, for the packed step's token ``ids`` ``[N]``."""
        x = F.embedding(ids, self.embed)
        cos, sin = self._rope(step.token_pos, x.dtype)
        q_size, kv_size = self.heads * self.head_dim, self.kv_heads * self.head_dim
        for i, (norm1, qkv_w, o_w, norm2, gate_up_w, down_w) in enumerate(self.layers):
            qkv = self.linear(self._rms_norm(x, norm1), qkv_w)
            q = qkv[:, :q_size].view(-1, self.heads, self.head_dim)
            k = qkv[:, q_size:q_size + kv_size].view(-1, self.kv_heads, self.head_dim)
            v = qkv[:, q_size + kv_size:].view(-1, self.kv_heads, self.head_dim)
            q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
            step.write(i, k, v)
            attn = slot_attend(i, q.transpose(0, 1)[None], step, self.scaling)
            x = x + self.linear(attn.reshape(len(ids), q_size), o_w)
            gate, up = self.linear(self._rms_norm(x, norm2), gate_up_w).chunk(2, dim=-1)
            x = x + self.linear(F.silu(gate) * up, down_w)
        return self.linear(self._rms_norm(x[step.last], self.norm), self.head)

    def _rms_norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """Hugging Face's ``LlamaRMSNorm``: in float32, then back to ``x.dtype``, times ``weight``."""
        h = x.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return weight * h.to(x.dtype)

    def _rope(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """``cos``, ``sin`` ``[N, 1, D]`` for ``positions`` ``[N]`` (``LlamaRotaryEmbedding``'s formula)."""
        freqs = positions[:, None].float() * self.inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos() * self.rope_scale, emb.sin() * self.rope_scale
        return cos.to(dtype)[:, None], sin.to(dtype)[:, None]


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE on ``x`` ``[N, H, D]``, as ``apply_rotary_pos_emb``."""
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin

