"""The optimisation loop shared by SFT and DPO and by both trainers: LR schedule, epochs of global
batches, gradient accumulation over micro-batches, clipping, non-finite checks, checkpoints and resume,
and the split of micro-batches over the processes of a ``torchrun`` group.

What differs between stages and trainers comes in as a :class:`Stage`: how a global batch is cut into
micro-batches and how one micro-batch gives its (already normalised) loss.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from fasteto.models.packed import causal_lm, tree_attention_enabled
from fasteto.trainer.batching import epoch_order
from fasteto.trainer.checkpoint import restore_training, save_checkpoint, step_dir, training_state
from fasteto.trainer.config import TrainConfig
from fasteto.trainer.distributed import all_reduce_sum, rank_share, world
from fasteto.trainer.logprobs import autocast_context, model_device

OnStep = Callable[[dict[str, Any]], None]
# micro-batch function: (item indices, global-batch normaliser) -> (scaled loss, weighted metrics, tokens)
MicroResult = tuple[torch.Tensor, dict[str, float], int]
MicroFn = Callable[[list[int], float], MicroResult]


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


def lr_factor(step: int, total_steps: int, warmup_ratio: float, schedule: str) -> float:
    """LR multiplier before optimizer step ``step`` (0-based): linear warmup over
    ``warmup = ceil(warmup_ratio * total_steps)`` steps, then cosine to 0 at ``total_steps`` or constant 1.

    The warmup ramps ``1/(w+1), 2/(w+1), ..., w/(w+1)`` and then reaches 1: no optimizer step runs at
    LR 0. Hugging Face's ``get_*_schedule_with_warmup`` (what ETO's public code ran) start at ``0/w``,
    which wastes the first step, and a whole run of a few steps (ceil makes ``w >= 1`` for any ratio > 0)
    loses a large share of its updates. After the warmup the two agree exactly."""
    warmup = math.ceil(warmup_ratio * total_steps)
    if step < warmup:
        return (step + 1) / (warmup + 1)
    if schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total_steps - warmup)
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))


def make_scheduler(
    optimizer: torch.optim.Optimizer, cfg: TrainConfig, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """The LR schedule of ``cfg`` (its ``warmup_ratio`` and ``schedule``) over ``total_steps``."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, total_steps, cfg.warmup_ratio, cfg.schedule)
    )


@dataclass
class Stage:
    """One training stage as the loop sees it.

    kind: "sft" or "dpo" (recorded in checkpoints). ids: the items' ids (for error messages).
    normaliser: global batch (item indices) -> the number its micro-batch losses are divided by.
    cut: global batch -> micro-batches (lists of item indices, each item once).
    micro: see ``MicroFn``; its loss is already scaled by the global normaliser.
    runner: the module whose forward ``micro`` calls (the model, or a ``PackedLogps`` around it).
    """

    kind: str
    ids: list[Any]
    normaliser: Callable[[list[int]], float]
    cut: Callable[[list[int]], list[list[int]]]
    micro: MicroFn
    runner: torch.nn.Module


def run_stage(
    model: torch.nn.Module,
    stage: Stage,
    cfg: TrainConfig,
    on_step: OnStep | None,
    checkpoint_dir: str | os.PathLike | None,
    resume_from: str | os.PathLike | None,
) -> list[dict[str, Any]]:
    """Train ``model`` (the causal LM, possibly peft-wrapped) for ``cfg.epochs``; returns the metrics of
    every step run. ``cfg`` is a validated ``TrainConfig``."""
    if not stage.ids:
        raise ValueError(f"{stage.kind}: nothing to train on (0 items)")
    if world()[1] > 1 and (checkpoint_dir is not None or resume_from is not None):
        raise NotImplementedError("checkpoints and resuming are not supported in multi-process runs yet; "
                                  "pass checkpoint_dir=None and resume_from=None")
    per_epoch = math.ceil(len(stage.ids) / cfg.global_batch)
    total = per_epoch * cfg.epochs
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = make_scheduler(optimizer, cfg, total)
    step, last_ckpt = 0, None
    if resume_from is not None:
        step = restore_training(resume_from, model, optimizer, scheduler, kind=stage.kind,
                                n_items=len(stage.ids), total_steps=total)
        last_ckpt = Path(resume_from)
    else:
        torch.manual_seed(cfg.seed)
    end = min(total, cfg.stop_at_step or total)
    stage.runner.train()
    history: list[dict[str, Any]] = []
    with _checkpointing(model, cfg.gradient_checkpointing):
        while step < end:
            epoch, k = divmod(step, per_epoch)
            order = epoch_slice(len(stage.ids), cfg.seed, epoch, k, cfg.global_batch)
            metrics = _optimizer_step(model, optimizer, scheduler, order, cfg, stage,
                                      (step + 1, epoch, last_ckpt))
            step += 1
            due = step == end or (cfg.save_every and step % cfg.save_every == 0)
            if checkpoint_dir is not None and due:
                state = training_state(optimizer, scheduler, kind=stage.kind, step=step,
                                       n_items=len(stage.ids), total_steps=total, config=asdict(cfg))
                last_ckpt = save_checkpoint(model, step_dir(checkpoint_dir, step), trainer_state=state)
                metrics["checkpoint"] = str(last_ckpt)
            history.append(metrics)
            if on_step is not None:
                on_step(metrics)
    return history


def epoch_slice(n: int, seed: int, epoch: int, k: int, global_batch: int) -> list[int]:
    """Item indices of global batch ``k`` of ``epoch``."""
    return epoch_order(n, seed, epoch)[k * global_batch : (k + 1) * global_batch]


@contextlib.contextmanager
def _checkpointing(model: torch.nn.Module, enable: bool):
    """Activation checkpointing of every decoder layer (non-reentrant) for the duration, if ``enable``."""
    lm = causal_lm(model)
    if not enable or lm.is_activation_checkpointing:  # off, or the caller's own setting: leave it be
        yield
        return
    if not getattr(lm, "supports_gradient_checkpointing", False):
        raise ValueError(f"{type(lm).__name__} does not support gradient checkpointing; set "
                         "gradient_checkpointing=False")
    lm.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    try:
        yield
    finally:
        lm.activation_checkpointing_disable()


def _optimizer_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LambdaLR,
    batch: list[int],
    cfg: TrainConfig,
    stage: Stage,
    where: tuple[int, int, Path | None],
) -> dict[str, Any]:
    """One optimizer step over the global batch ``batch`` (item indices); ``where`` = (step, epoch, last
    checkpoint) for error messages."""
    step, epoch, last_ckpt = where
    start = time.perf_counter()
    device = model_device(model)
    lr = scheduler.get_last_lr()[0]
    optimizer.zero_grad(set_to_none=True)
    rank, world_size = world()
    totals: dict[str, float] = defaultdict(float)
    bad: tuple[float, list[int]] | None = None
    # Tree attention stays on through backward: activation checkpointing re-runs attention there.
    attention = (tree_attention_enabled(model, cfg.attn_impl) if cfg.trainer == "fast"
                 else contextlib.nullcontext())
    norm = stage.normaliser(batch)
    with attention:
        for chunk, live in rank_share(stage.cut(batch), rank, world_size):
            with autocast_context(device, cfg.bf16):
                loss, metrics, n = stage.micro(chunk, norm)
            if not live:  # a repeat that keeps this process in step with the others' collectives
                loss, metrics, n = loss * 0.0, dict.fromkeys(metrics, 0.0), 0
            value = loss.item()
            if not math.isfinite(value):
                if world_size == 1:
                    ids = [stage.ids[i] for i in chunk]
                    raise NonFiniteLossError("loss", value, step, epoch, ids, last_ckpt)
                bad = bad or (value, chunk)
            loss.backward()
            totals["loss"] += value
            for key, v in metrics.items():
                totals[key] += v
            totals["tokens"] += n
    totals = _global_totals(totals, bad is not None, device)
    if totals.pop("non_finite"):
        value, chunk = bad or (totals["loss"], batch)
        raise NonFiniteLossError("loss", value, step, epoch, [stage.ids[i] for i in chunk], last_ckpt)
    grad_norm = _clip(model, cfg.max_grad_norm)
    if not math.isfinite(grad_norm):
        raise NonFiniteLossError("gradient norm", grad_norm, step, epoch, [stage.ids[i] for i in batch],
                                 last_ckpt)
    optimizer.step()
    scheduler.step()
    seconds = max(time.perf_counter() - start, 1e-9)
    tokens = int(totals.pop("tokens"))
    out = {"step": step, "epoch": epoch, "lr": lr, "grad_norm": grad_norm, "tokens": tokens,
           "tokens_per_s": tokens / seconds}
    if "tokens_plain" in totals:
        totals["tokens_plain"] = int(totals["tokens_plain"])
        out["tokens_plain_per_s"] = totals["tokens_plain"] / seconds
    return {**out, **totals}


def _global_totals(totals: dict[str, float], non_finite: bool, device: torch.device) -> dict[str, float]:
    """Sum the step's totals over the processes (identity in one process); adds ``non_finite`` (count of
    processes that saw a non-finite loss)."""
    keys = sorted(totals)
    values = all_reduce_sum([totals[k] for k in keys] + [float(non_finite)], device)
    return {**dict(zip(keys, values[:-1], strict=True)), "non_finite": values[-1]}


def _clip(model: torch.nn.Module, max_grad_norm: float) -> float:
    """Clip the trainable parameters' gradient norm (0: no clipping); returns the norm before clipping."""
    params = [p for p in model.parameters() if p.requires_grad]
    norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm if max_grad_norm > 0 else math.inf)
    if hasattr(norm, "full_tensor"):  # FSDP: a replicated DTensor
        norm = norm.full_tensor()
    return float(norm)
