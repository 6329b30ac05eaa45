"""The trainer: SFT (ETO step 1) and DPO (ETO step 4), with two interchangeable ways to run a batch.

One optimizer step consumes one *global batch* of ``cfg.global_batch`` items (the last step of an epoch
may have fewer), run as micro-batches whose gradients accumulate. Each micro-batch loss is scaled so the
accumulated gradient equals the gradient of the whole global batch's loss: SFT divides token sums by the
global batch's model-token count; DPO multiplies each micro-batch's pair-mean by (its pairs / global
pairs). The item order of each epoch comes from ``(seed, epoch)`` only, so a run resumed from a
checkpoint replays exactly the batches (and losses) of an uninterrupted run; a fresh run seeds torch's
global RNG with ``cfg.seed`` (dropout), a resumed one restores the saved RNG state.

``cfg.trainer`` picks how a micro-batch runs:

- ``"plain"``, the reference: micro-batches of ``cfg.micro_batch`` items, right-padded, full logits.
- ``"fast"``: micro-batches of at most ``cfg.token_budget`` packed tokens (``packing.plan_micro_batches``),
  each one padding-free token tree whose shared prefixes are computed once, tree attention inside the
  model and fused log-probs on the LM head (``trainer.packed``). Same losses as "plain" in exact
  arithmetic: a shared token's log-prob counts for every sequence through it.

In a ``torchrun`` process group (``trainer.distributed``) each process runs its share of every global
batch's micro-batches and the gradients are summed.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from fasteto.data.tokenized import TokenizedPair, TokenizedSequence
from fasteto.ops.logprob.api import IMPLS as LOGPROB_IMPLS
from fasteto.ops.tree_attention import IMPLS as ATTN_IMPLS
from fasteto.packing import pack_pairs, pack_sequences, plan_micro_batches
from fasteto.trainer.batching import micro_batches, pad_pairs, pad_sequences
from fasteto.trainer.distributed import is_sharded
from fasteto.trainer.logprobs import model_device, sequence_logps, token_logps
from fasteto.trainer.losses import PREFERENCE_LOSSES, preference_loss, sft_loss
from fasteto.trainer.packed import PackedLogps
from fasteto.trainer.steps import (  # noqa: F401  (re-exported: the trainer's public names live here)
    MicroFn,
    NonFiniteLossError,
    OnStep,
    Stage,
    lr_factor,
    make_scheduler,
    run_stage,
)

TRAINERS = ("fast", "plain")


@dataclass
class TrainConfig:
    """One training stage. Defaults are ETO's SFT settings; ``TrainConfig.dpo(iteration)`` gives DPO's."""

    lr: float = 2e-5
    epochs: int = 3
    global_batch: int = 64  # items per optimizer step
    micro_batch: int = 1  # plain trainer: items per forward pass; must divide global_batch
    schedule: str = "cosine"  # "cosine" | "constant" (both with linear warmup from 0)
    warmup_ratio: float = 0.03  # warmup steps = ceil(ratio * total steps), as Hugging Face's Trainer
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0  # 0 disables clipping (the norm is still reported)
    beta: float = 0.1  # DPO β
    loss: str = "sigmoid"  # one of losses.PREFERENCE_LOSSES: "sigmoid" | "ipo" | "sigmoid_norm" | "hinge"
    seed: int = 0
    bf16: bool | str = "auto"  # "auto": autocast bf16 only on CUDA with bf16; True: also on CPU
    pad_id: int = 0  # plain trainer: any valid id; padding is masked out of attention and loss
    save_every: int = 0  # checkpoint every N steps (0: only the last step of the call)
    # stop after this optimizer step (None: run all); the LR schedule still spans all epochs
    stop_at_step: int | None = None
    trainer: str = "fast"  # "fast": packed token trees + fused log-probs; "plain": the padded reference
    token_budget: int = 8192  # fast trainer: packed tokens per micro-batch (micro_batch is not used)
    attn_impl: str = "auto"  # fast trainer: tree attention backend (fasteto.ops.tree_attention.IMPLS)
    logprob_impl: str = "auto"  # fast trainer: fused log-prob backend (fasteto.ops.logprob.api.IMPLS)
    gradient_checkpointing: bool = False  # both trainers: recompute each decoder layer in backward

    @classmethod
    def sft(cls, **overrides: Any) -> TrainConfig:
        return cls(**overrides)

    @classmethod
    def dpo(cls, iteration: int = 1, **overrides: Any) -> TrainConfig:
        """ETO's DPO: batch 32, 3 epochs, constant LR with 10% warmup; β 0.1 / lr 1e-6 in iteration 1,
        β 0.5 / lr 5e-7 afterwards."""
        first = iteration <= 1
        base = dict(
            lr=1e-6 if first else 5e-7,
            beta=0.1 if first else 0.5,
            global_batch=32,
            schedule="constant",
            warmup_ratio=0.1,
        )
        return cls(**{**base, **overrides})

    def validate(self) -> None:
        """Raise ValueError naming the first option that cannot be used, and what is allowed."""
        if self.trainer not in TRAINERS:
            raise ValueError(f"trainer must be 'fast' or 'plain', got {self.trainer!r}")
        if self.global_batch < 1:
            raise ValueError(f"global_batch must be ≥ 1, got {self.global_batch}")
        if self.trainer == "plain" and (self.micro_batch < 1 or self.global_batch % self.micro_batch):
            raise ValueError(
                f"micro_batch ({self.micro_batch}) must divide global_batch ({self.global_batch})"
            )
        budget = self.token_budget
        if isinstance(budget, bool) or not isinstance(budget, int) or budget < 1:
            raise ValueError(f"token_budget must be a positive number of tokens, got {self.token_budget!r}")
        for name, value, allowed in (("attn_impl", self.attn_impl, ATTN_IMPLS),
                                     ("logprob_impl", self.logprob_impl, LOGPROB_IMPLS),
                                     ("schedule", self.schedule, ("cosine", "constant")),
                                     ("loss", self.loss, PREFERENCE_LOSSES)):
            if value not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(map(repr, allowed))}, got {value!r}")
        if not isinstance(self.gradient_checkpointing, bool):
            raise ValueError(
                f"gradient_checkpointing must be True or False, got {self.gradient_checkpointing!r}"
            )
        if self.epochs < 1:
            raise ValueError(f"epochs must be ≥ 1, got {self.epochs}")


def _to(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in batch.items()}


def train_sft(
    model: torch.nn.Module,
    seqs: Sequence[TokenizedSequence],
    cfg: TrainConfig,
    on_step: OnStep | None = None,
    checkpoint_dir: str | os.PathLike | None = None,
    resume_from: str | os.PathLike | None = None,
) -> list[dict[str, Any]]:
    """Behavioural cloning: token-mean cross-entropy on model tokens of each global batch.

    ``model``: a transformers causal LM, possibly peft-wrapped (``lora.apply_lora``), or what
    ``distributed.shard_model`` returned. Returns the metrics of every step this call ran (also passed to
    ``on_step``): ``step`` (1-based), ``epoch`` (0-based), ``loss``, ``lr``, ``grad_norm``, ``tokens``
    (tokens run: non-pad tokens for "plain", packed tokens for "fast"), ``tokens_per_s``, ``tokens_plain``
    (the non-pad tokens of the sequences, whichever trainer ran) and ``tokens_plain_per_s``,
    ``model_tokens``, and ``checkpoint`` when one was saved after the step.
    """
    cfg.validate()
    n_model = [sum(s.loss_mask[1:]) for s in seqs]
    if empty := [s.id for s, n in zip(seqs, n_model, strict=True) if n == 0]:
        raise ValueError(
            f"SFT sequences without model tokens (fix their loss masks or drop them): {empty[:10]}"
        )
    model, runner = _models(model, cfg)
    make = _sft_fast if cfg.trainer == "fast" else _sft_plain
    stage = Stage("sft", [s.id for s in seqs], lambda idx: float(sum(n_model[i] for i in idx)),
                  _cutter(seqs, cfg), make(seqs, n_model, cfg, runner), runner)
    return run_stage(model, stage, cfg, on_step, checkpoint_dir, resume_from)


def _sft_plain(seqs: Sequence[TokenizedSequence], n_model: list[int], cfg: TrainConfig,
               model: torch.nn.Module) -> MicroFn:
    device = model_device(model)

    def micro(idx: list[int], global_tokens: float) -> tuple[torch.Tensor, dict[str, float], int]:
        batch = _to(pad_sequences([seqs[i] for i in idx], cfg.pad_id), device)
        logits = model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False
        ).logits
        loss = sft_loss(token_logps(logits, batch["input_ids"]), batch["loss_mask"], global_tokens)
        tokens = int(batch["attention_mask"].sum())
        metrics = {"model_tokens": float(sum(n_model[i] for i in idx)), "tokens_plain": float(tokens)}
        return loss, metrics, tokens

    return micro


def _sft_fast(seqs: Sequence[TokenizedSequence], n_model: list[int], cfg: TrainConfig,
              runner: torch.nn.Module) -> MicroFn:
    device = model_device(runner)

    def micro(idx: list[int], global_tokens: float) -> tuple[torch.Tensor, dict[str, float], int]:
        chunk = [seqs[i] for i in idx]
        batch = pack_sequences(chunk).to(device)
        sums, _ = runner(batch, cfg.attn_impl, cfg.logprob_impl)
        metrics = {"model_tokens": float(sum(n_model[i] for i in idx)),
                   "tokens_plain": float(sum(len(s.input_ids) for s in chunk))}
        return -sums.sum() / global_tokens, metrics, batch.num_tokens

    return micro


def train_dpo(
    model: torch.nn.Module,
    pairs: Sequence[TokenizedPair],
    ref_logps: dict[int, tuple[float, float]],
    cfg: TrainConfig,
    on_step: OnStep | None = None,
    checkpoint_dir: str | os.PathLike | None = None,
    resume_from: str | os.PathLike | None = None,
) -> list[dict[str, Any]]:
    """DPO against precomputed reference log-probs (``logprobs.reference_logps`` or
    ``packed.reference_logps_packed``, keyed by pair index).

    Metrics as ``train_sft`` (without ``model_tokens``) plus ``rewards/chosen``, ``rewards/rejected``,
    ``rewards/accuracy``, ``rewards/margin`` (see ``losses``) and ``logps/chosen``, ``logps/rejected``
    (policy summed log-probs), all means over the global batch's pairs.
    """
    cfg.validate()
    if missing := [i for i in range(len(pairs)) if i not in ref_logps]:
        raise ValueError(
            f"ref_logps lacks pairs {missing[:10]}: compute reference_logps on this exact pair list"
        )
    if empty := [p.id for p in pairs if not any(p.chosen_mask) or not any(p.rejected_mask)]:
        raise ValueError(f"DPO pairs whose chosen or rejected has no model tokens: {empty[:10]}")
    model, runner = _models(model, cfg)
    make = _dpo_fast if cfg.trainer == "fast" else _dpo_plain
    stage = Stage("dpo", [p.id for p in pairs], lambda idx: float(len(idx)), _cutter(pairs, cfg),
                  make(pairs, ref_logps, cfg, runner), runner)
    return run_stage(model, stage, cfg, on_step, checkpoint_dir, resume_from)


def _dpo_plain(pairs: Sequence[TokenizedPair], ref_logps: dict[int, tuple[float, float]], cfg: TrainConfig,
               model: torch.nn.Module) -> MicroFn:
    device = model_device(model)

    def micro(idx: list[int], global_pairs: float) -> tuple[torch.Tensor, dict[str, float], int]:
        batch = _to(pad_pairs([pairs[i] for i in idx], cfg.pad_id), device)
        logp, n_tok = sequence_logps(model, batch["input_ids"], batch["loss_mask"], batch["attention_mask"])
        b = len(idx)
        loss, out = _dpo_loss(cfg, ref_logps, idx, (logp[:b], logp[b:]), (n_tok[:b], n_tok[b:]), global_pairs)
        tokens = int(batch["attention_mask"].sum())
        return loss, {**out, "tokens_plain": float(tokens)}, tokens

    return micro


def _dpo_fast(pairs: Sequence[TokenizedPair], ref_logps: dict[int, tuple[float, float]], cfg: TrainConfig,
              runner: torch.nn.Module) -> MicroFn:
    device = model_device(runner)

    def micro(idx: list[int], global_pairs: float) -> tuple[torch.Tensor, dict[str, float], int]:
        chunk = [pairs[i] for i in idx]
        batch, chosen, rejected = pack_pairs(chunk)
        sums, counts = runner(batch.to(device), cfg.attn_impl, cfg.logprob_impl)
        chosen, rejected = chosen.to(device), rejected.to(device)
        loss, out = _dpo_loss(cfg, ref_logps, idx, (sums[chosen], sums[rejected]),
                              (counts[chosen], counts[rejected]), global_pairs)
        plain = sum(2 * len(p.prompt_ids) + len(p.chosen_ids) + len(p.rejected_ids) for p in chunk)
        return loss, {**out, "tokens_plain": float(plain)}, batch.num_tokens

    return micro


def _dpo_loss(cfg: TrainConfig, ref_logps: dict[int, tuple[float, float]], idx: list[int],
              policy: tuple[torch.Tensor, torch.Tensor], n_tokens: tuple[torch.Tensor, torch.Tensor],
              global_pairs: float) -> tuple[torch.Tensor, dict[str, float]]:
    """The micro-batch's share of the global batch's mean loss, and its weighted metrics; ``policy`` and
    ``n_tokens`` are (chosen, rejected) ``[b]`` tensors in the order of ``idx``."""
    (pol_c, pol_r), (n_c, n_r) = policy, n_tokens
    ref = torch.tensor([ref_logps[i] for i in idx], dtype=torch.float32, device=pol_c.device)
    loss, metrics = preference_loss(cfg.loss, pol_c, pol_r, ref[:, 0], ref[:, 1], cfg.beta, n_c, n_r)
    weight = len(idx) / global_pairs
    out = {k: v.item() * weight for k, v in metrics.items()}
    out["logps/chosen"] = pol_c.detach().mean().item() * weight
    out["logps/rejected"] = pol_r.detach().mean().item() * weight
    return loss * weight, out


def _cutter(records: Sequence[TokenizedPair] | Sequence[TokenizedSequence],
            cfg: TrainConfig) -> Callable[[list[int]], list[list[int]]]:
    """How a global batch (item indices) is cut: ``micro_batch`` items at a time ("plain"), or packed
    micro-batches within the token budget ("fast"; the planner groups items that share prefixes)."""
    if cfg.trainer == "plain":
        return lambda batch: micro_batches(batch, cfg.micro_batch)

    def cut(batch: list[int]) -> list[list[int]]:
        plan = plan_micro_batches([records[i] for i in batch], cfg.token_budget)
        return [[batch[j] for j in micro] for micro in plan]

    return cut


def _models(model: torch.nn.Module, cfg: TrainConfig) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(the model to optimise and save, the module micro-batches call): for "fast" the latter is a
    ``PackedLogps`` around the model (given, when ``distributed.shard_model`` made it the FSDP root)."""
    if isinstance(model, PackedLogps):
        if cfg.trainer != "fast":
            raise ValueError("got a PackedLogps (a model prepared for the fast trainer, e.g. by "
                             "shard_model(model, trainer='fast')) with trainer='plain'; pass the causal LM")
        return model.model, model
    if cfg.trainer == "fast" and is_sharded(model):
        raise ValueError("this model is sharded as the plain trainer's FSDP root; for trainer='fast' shard "
                         "it with shard_model(model, trainer='fast') and pass what that returns")
    return model, (PackedLogps(model) if cfg.trainer == "fast" else model)
