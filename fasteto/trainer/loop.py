"""The plain reference trainer: SFT (ETO step 1) and DPO (ETO step 4) on right-padded batches.

One optimizer step consumes one *global batch* of ``cfg.global_batch`` items (the last step of an epoch
may have fewer), run as micro-batches of ``cfg.micro_batch`` items whose gradients accumulate. Each
micro-batch loss is scaled so the accumulated gradient equals the gradient of the whole global batch's
loss: SFT divides token sums by the global batch's model-token count; DPO multiplies each micro-batch's
pair-mean by (its pairs / global pairs). The item order of each epoch comes from ``(seed, epoch)`` only,
so a run resumed from a checkpoint replays exactly the batches (and losses) of an uninterrupted run; a
fresh run seeds torch's global RNG with ``cfg.seed`` (dropout), a resumed one restores the saved RNG state.

Faster trainers (packed, fused) must reproduce the losses of this one.
"""

from __future__ import annotations

import math
import os
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from fasteto.data.tokenized import TokenizedPair, TokenizedSequence
from fasteto.trainer.batching import epoch_order, micro_batches, pad_pairs, pad_sequences
from fasteto.trainer.checkpoint import restore_training, save_checkpoint, step_dir, training_state
from fasteto.trainer.logprobs import autocast_context, model_device, sequence_logps, token_logps
from fasteto.trainer.losses import preference_loss, sft_loss

OnStep = Callable[[dict[str, Any]], None]
# micro-batch function: (item indices, global-batch normaliser) -> (scaled loss, weighted metrics, tokens)
_MicroFn = Callable[[list[int], float], tuple[torch.Tensor, dict[str, float], int]]


class NonFiniteLossError(RuntimeError):
    """A loss or gradient norm was NaN/inf. Carries ``step`` (1-based optimizer step), ``ids`` (item ids
    of the micro-batch whose loss was non-finite, or of the whole global batch for a gradient norm) and
    ``checkpoint`` (the last checkpoint saved in this run or resumed from, or None)."""

    def __init__(
        self, what: str, value: float, step: int, epoch: int, ids: list[Any], checkpoint: Path | None
    ):
        self.step, self.ids, self.checkpoint = step, ids, checkpoint
        where = str(checkpoint) if checkpoint is not None else "none saved yet"
        super().__init__(
            f"non-finite {what} ({value}) at optimizer step {step} (epoch {epoch}); batch item ids: {ids}; "
            f"last good checkpoint: {where}. Inspect these items or lower the learning rate, then restart "
            "(resume_from=<checkpoint> continues from a saved step)"
        )


@dataclass
class TrainConfig:
    """One training stage. Defaults are ETO's SFT settings; ``TrainConfig.dpo(iteration)`` gives DPO's."""

    lr: float = 2e-5
    epochs: int = 3
    global_batch: int = 64  # items per optimizer step
    micro_batch: int = 1  # items per forward pass; must divide global_batch
    schedule: str = "cosine"  # "cosine" | "constant" (both with linear warmup from 0)
    warmup_ratio: float = 0.03  # warmup steps = ceil(ratio * total steps), as Hugging Face's Trainer
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0  # 0 disables clipping (the norm is still reported)
    beta: float = 0.1  # DPO β
    loss: str = "sigmoid"  # "sigmoid" | "ipo" | "sigmoid_norm"
    seed: int = 0
    bf16: bool | str = "auto"  # "auto": autocast bf16 only on CUDA with bf16; True: also on CPU
    pad_id: int = 0  # any valid id: padding is masked out of attention and loss
    save_every: int = 0  # checkpoint every N steps (0: only the last step of the call)
    # stop after this optimizer step (None: run all); the LR schedule still spans all epochs
    stop_at_step: int | None = None

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
        if self.global_batch < 1 or self.micro_batch < 1 or self.global_batch % self.micro_batch:
            raise ValueError(
                f"micro_batch ({self.micro_batch}) must divide global_batch ({self.global_batch})"
            )
        if self.schedule not in ("cosine", "constant"):
            raise ValueError(f"schedule must be 'cosine' or 'constant', got {self.schedule!r}")
        if self.loss not in ("sigmoid", "ipo", "sigmoid_norm"):
            raise ValueError(f"loss must be 'sigmoid', 'ipo' or 'sigmoid_norm', got {self.loss!r}")
        if self.epochs < 1:
            raise ValueError(f"epochs must be ≥ 1, got {self.epochs}")


def lr_factor(step: int, total_steps: int, warmup_ratio: float, schedule: str) -> float:
    """LR multiplier before optimizer step ``step`` (0-based), matching transformers'
    ``get_cosine_schedule_with_warmup`` / ``get_constant_schedule_with_warmup`` with
    ``warmup = ceil(warmup_ratio * total_steps)``: linear 0 → 1 over the warmup, then cosine to 0 at
    ``total_steps`` or constant 1."""
    warmup = math.ceil(warmup_ratio * total_steps)
    if step < warmup:
        return step / max(1, warmup)
    if schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total_steps - warmup)
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))


def make_scheduler(
    optimizer: torch.optim.Optimizer, cfg: TrainConfig, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, total_steps, cfg.warmup_ratio, cfg.schedule)
    )


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

    Returns the metrics of every step this call ran (also passed to ``on_step``): ``step`` (1-based),
    ``epoch`` (0-based), ``loss``, ``lr``, ``grad_norm``, ``tokens`` (non-pad tokens run), ``tokens_per_s``,
    ``model_tokens``, and ``checkpoint`` when one was saved after the step.
    """
    n_model = [sum(s.loss_mask[1:]) for s in seqs]
    if empty := [s.id for s, n in zip(seqs, n_model, strict=True) if n == 0]:
        raise ValueError(
            f"SFT sequences without model tokens (fix their loss masks or drop them): {empty[:10]}"
        )
    device = model_device(model)

    def micro(idx: list[int], global_tokens: float) -> tuple[torch.Tensor, dict[str, float], int]:
        batch = _to(pad_sequences([seqs[i] for i in idx], cfg.pad_id), device)
        logits = model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False
        ).logits
        loss = sft_loss(token_logps(logits, batch["input_ids"]), batch["loss_mask"], global_tokens)
        return loss, {"model_tokens": float(sum(n_model[i] for i in idx))}, int(batch["attention_mask"].sum())

    return _train(
        model,
        [s.id for s in seqs],
        cfg,
        "sft",
        lambda idx: float(sum(n_model[i] for i in idx)),
        micro,
        on_step,
        checkpoint_dir,
        resume_from,
    )


def train_dpo(
    model: torch.nn.Module,
    pairs: Sequence[TokenizedPair],
    ref_logps: dict[int, tuple[float, float]],
    cfg: TrainConfig,
    on_step: OnStep | None = None,
    checkpoint_dir: str | os.PathLike | None = None,
    resume_from: str | os.PathLike | None = None,
) -> list[dict[str, Any]]:
    """DPO against precomputed reference log-probs (``logprobs.reference_logps``, keyed by pair index).

    Metrics as ``train_sft`` (without ``model_tokens``) plus ``rewards/chosen``, ``rewards/rejected``,
    ``rewards/accuracy``, ``rewards/margin`` (see ``losses``) and ``logps/chosen``, ``logps/rejected``
    (policy summed log-probs), all means over the global batch's pairs.
    """
    if missing := [i for i in range(len(pairs)) if i not in ref_logps]:
        raise ValueError(
            f"ref_logps lacks pairs {missing[:10]}: compute reference_logps on this exact pair list"
        )
    if empty := [p.id for p in pairs if not any(p.chosen_mask) or not any(p.rejected_mask)]:
        raise ValueError(f"DPO pairs whose chosen or rejected has no model tokens: {empty[:10]}")
    device = model_device(model)

    def micro(idx: list[int], global_pairs: float) -> tuple[torch.Tensor, dict[str, float], int]:
        batch = _to(pad_pairs([pairs[i] for i in idx], cfg.pad_id), device)
        logp, n_tok = sequence_logps(model, batch["input_ids"], batch["loss_mask"], batch["attention_mask"])
        b = len(idx)
        ref = torch.tensor([ref_logps[i] for i in idx], dtype=torch.float32, device=device)
        loss, metrics = preference_loss(
            cfg.loss, logp[:b], logp[b:], ref[:, 0], ref[:, 1], cfg.beta, n_tok[:b], n_tok[b:]
        )
        weight = b / global_pairs
        out = {k: v.item() * weight for k, v in metrics.items()}
        out["logps/chosen"] = logp[:b].detach().mean().item() * weight
        out["logps/rejected"] = logp[b:].detach().mean().item() * weight
        return loss * weight, out, int(batch["attention_mask"].sum())

    return _train(
        model,
        [p.id for p in pairs],
        cfg,
        "dpo",
        lambda idx: float(len(idx)),
        micro,
        on_step,
        checkpoint_dir,
        resume_from,
    )


def _train(
    model: torch.nn.Module,
    ids: list[Any],
    cfg: TrainConfig,
    kind: str,
    normaliser: Callable[[list[int]], float],
    micro: _MicroFn,
    on_step: OnStep | None,
    checkpoint_dir: str | os.PathLike | None,
    resume_from: str | os.PathLike | None,
) -> list[dict[str, Any]]:
    cfg.validate()
    if not ids:
        raise ValueError(f"{kind}: nothing to train on (0 items)")
    per_epoch = math.ceil(len(ids) / cfg.global_batch)
    total = per_epoch * cfg.epochs
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = make_scheduler(optimizer, cfg, total)
    step, last_ckpt = 0, None
    if resume_from is not None:
        step = restore_training(
            resume_from, model, optimizer, scheduler, kind=kind, n_items=len(ids), total_steps=total
        )
        last_ckpt = Path(resume_from)
    else:
        torch.manual_seed(cfg.seed)
    end = min(total, cfg.stop_at_step or total)
    model.train()
    history: list[dict[str, Any]] = []
    while step < end:
        epoch, k = divmod(step, per_epoch)
        batch = epoch_order(len(ids), cfg.seed, epoch)[k * cfg.global_batch : (k + 1) * cfg.global_batch]
        metrics = _optimizer_step(
            model,
            optimizer,
            scheduler,
            batch,
            cfg,
            normaliser(batch),
            micro,
            (step + 1, epoch, ids, last_ckpt),
        )
        step += 1
        if checkpoint_dir is not None and (step == end or (cfg.save_every and step % cfg.save_every == 0)):
            state = training_state(
                optimizer,
                scheduler,
                kind=kind,
                step=step,
                n_items=len(ids),
                total_steps=total,
                config=asdict(cfg),
            )
            last_ckpt = save_checkpoint(model, step_dir(checkpoint_dir, step), trainer_state=state)
            metrics["checkpoint"] = str(last_ckpt)
        history.append(metrics)
        if on_step is not None:
            on_step(metrics)
    return history


def _optimizer_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LambdaLR,
    batch: list[int],
    cfg: TrainConfig,
    norm: float,
    micro: _MicroFn,
    where: tuple[int, int, list[Any], Path | None],
) -> dict[str, Any]:
    """One optimizer step over the global batch ``batch`` (item indices); ``where`` = (step, epoch, all
    item ids, last checkpoint) for error messages."""
    step, epoch, ids, last_ckpt = where
    start = time.perf_counter()
    device = model_device(model)
    lr = scheduler.get_last_lr()[0]
    optimizer.zero_grad(set_to_none=True)
    totals: dict[str, float] = defaultdict(float)
    tokens = 0
    for chunk in micro_batches(batch, cfg.micro_batch):
        with autocast_context(device, cfg.bf16):
            loss, metrics, n = micro(chunk, norm)
        value = loss.item()
        if not math.isfinite(value):
            raise NonFiniteLossError("loss", value, step, epoch, [ids[i] for i in chunk], last_ckpt)
        loss.backward()
        totals["loss"] += value
        for key, v in metrics.items():
            totals[key] += v
        tokens += n
    max_norm = cfg.max_grad_norm if cfg.max_grad_norm > 0 else math.inf
    grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm))
    if not math.isfinite(grad_norm):
        raise NonFiniteLossError("gradient norm", grad_norm, step, epoch, [ids[i] for i in batch], last_ckpt)
    optimizer.step()
    scheduler.step()
    seconds = time.perf_counter() - start
    return {
        "step": step,
        "epoch": epoch,
        "lr": lr,
        "grad_norm": grad_norm,
        "tokens": tokens,
        "tokens_per_s": tokens / max(seconds, 1e-9),
        **totals,
    }
