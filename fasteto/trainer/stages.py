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
  model and fused log-probs on the LM head (``models.packed``). Same losses as "plain" in exact
  arithmetic: a shared token's log-prob counts for every sequence through it.

In a ``torchrun`` process group (``trainer.distributed``) each process runs its share of every global
batch's micro-batches and the gradients are summed.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Sequence
from typing import Any

import torch

from fasteto.data.tokenized import TokenizedPair, TokenizedSequence
from fasteto.models.packed import PackedLogps
from fasteto.packing import pack_pairs, pack_sequences, plan_micro_batches
from fasteto.trainer.batching import micro_batches, pad_pairs, pad_sequences
from fasteto.trainer.config import TrainConfig
from fasteto.trainer.distributed import is_sharded
from fasteto.trainer.logprobs import model_device, sequence_logps, token_logps
from fasteto.trainer.loop import MicroResult, OnStep, Stage, run_stage
from fasteto.trainer.losses import chosen_nll_term, preference_loss, sft_loss

RefLogps = dict[int, tuple[float, float]]  # pair index -> (chosen, rejected) reference log-prob sums


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
    micro = functools.partial(sft_micro_fast if cfg.trainer == "fast" else sft_micro_plain,
                              runner, seqs, n_model, cfg)
    stage = Stage("sft", [s.id for s in seqs], lambda idx: float(sum(n_model[i] for i in idx)),
                  _cutter(seqs, cfg), micro, runner)
    return run_stage(model, stage, cfg, on_step, checkpoint_dir, resume_from)


def sft_micro_plain(model: torch.nn.Module, seqs: Sequence[TokenizedSequence], n_model: list[int],
                    cfg: TrainConfig, idx: list[int], global_tokens: float) -> MicroResult:
    """One plain SFT micro-batch: pad → full logits → token log-probs → masked sum / global tokens."""
    batch = _to(pad_sequences([seqs[i] for i in idx], cfg.pad_id), model_device(model))
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                   use_cache=False).logits
    loss = sft_loss(token_logps(logits, batch["input_ids"]), batch["loss_mask"], global_tokens)
    tokens = int(batch["attention_mask"].sum())
    metrics = {"model_tokens": float(sum(n_model[i] for i in idx)), "tokens_plain": float(tokens)}
    return loss, metrics, tokens


def sft_micro_fast(runner: PackedLogps, seqs: Sequence[TokenizedSequence], n_model: list[int],
                   cfg: TrainConfig, idx: list[int], global_tokens: float) -> MicroResult:
    """One fast SFT micro-batch: pack → (hidden states → fused log-probs → sequence sums, in
    ``PackedLogps.forward``) → −sum / global tokens."""
    chunk = [seqs[i] for i in idx]
    batch = pack_sequences(chunk).to(model_device(runner))
    sums, _ = runner(batch, cfg.attn_impl, cfg.logprob_impl)
    metrics = {"model_tokens": float(sum(n_model[i] for i in idx)),
               "tokens_plain": float(sum(len(s.input_ids) for s in chunk))}
    return -sums.sum() / global_tokens, metrics, batch.num_tokens


def train_dpo(
    model: torch.nn.Module,
    pairs: Sequence[TokenizedPair],
    ref_logps: RefLogps,
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
    micro = functools.partial(dpo_micro_fast if cfg.trainer == "fast" else dpo_micro_plain,
                              runner, pairs, ref_logps, cfg)
    stage = Stage("dpo", [p.id for p in pairs], lambda idx: float(len(idx)), _cutter(pairs, cfg), micro,
                  runner)
    return run_stage(model, stage, cfg, on_step, checkpoint_dir, resume_from)


def dpo_micro_plain(model: torch.nn.Module, pairs: Sequence[TokenizedPair], ref_logps: RefLogps,
                    cfg: TrainConfig, idx: list[int], global_pairs: float) -> MicroResult:
    """One plain DPO micro-batch: pad chosen and rejected (prompt repeated) → full logits → masked
    sequence sums → loss × (pairs here / global pairs)."""
    batch = _to(pad_pairs([pairs[i] for i in idx], cfg.pad_id), model_device(model))
    logp, n_tok = sequence_logps(model, batch["input_ids"], batch["loss_mask"], batch["attention_mask"])
    b = len(idx)
    loss, out = _dpo_loss(cfg, ref_logps, idx, (logp[:b], logp[b:]), (n_tok[:b], n_tok[b:]), global_pairs)
    tokens = int(batch["attention_mask"].sum())
    return loss, {**out, "tokens_plain": float(tokens)}, tokens


def dpo_micro_fast(runner: PackedLogps, pairs: Sequence[TokenizedPair], ref_logps: RefLogps,
                   cfg: TrainConfig, idx: list[int], global_pairs: float) -> MicroResult:
    """One fast DPO micro-batch, the trainer's hot path:

    1. pack: the pairs' prompts, chosen and rejected as one token tree (each shared prefix once);
    2. hidden states: the decoder over the tree with tree attention (``PackedLogps.forward``);
    3. fused log-probs: the LM head and log-softmax at model-token rows only, no ``[N, V]`` logits;
    4. sequence sums: each sequence's model-token log-probs, a shared token counted for each sequence;
    5. loss: the preference loss against the reference sums, × (pairs here / global pairs).
    """
    chunk = [pairs[i] for i in idx]
    batch, chosen, rejected = pack_pairs(chunk)  # 1
    device = model_device(runner)
    sums, counts = runner(batch.to(device), cfg.attn_impl, cfg.logprob_impl)  # 2-4
    chosen, rejected = chosen.to(device), rejected.to(device)
    loss, out = _dpo_loss(cfg, ref_logps, idx, (sums[chosen], sums[rejected]),  # 5
                          (counts[chosen], counts[rejected]), global_pairs)
    plain = sum(2 * len(p.prompt_ids) + len(p.chosen_ids) + len(p.rejected_ids) for p in chunk)
    return loss, {**out, "tokens_plain": float(plain)}, batch.num_tokens


def _dpo_loss(cfg: TrainConfig, ref_logps: RefLogps, idx: list[int],
              policy: tuple[torch.Tensor, torch.Tensor], n_tokens: tuple[torch.Tensor, torch.Tensor],
              global_pairs: float) -> tuple[torch.Tensor, dict[str, float]]:
    """The micro-batch's share of the global batch's mean loss, and its weighted metrics; ``policy`` and
    ``n_tokens`` are (chosen, rejected) ``[b]`` tensors in the order of ``idx``."""
    (pol_c, pol_r), (n_c, n_r) = policy, n_tokens
    ref = torch.tensor([ref_logps[i] for i in idx], dtype=torch.float32, device=pol_c.device)
    loss, metrics = preference_loss(cfg.loss, pol_c, pol_r, ref[:, 0], ref[:, 1], cfg.beta, n_c, n_r)
    if cfg.sft_weight:
        loss, metrics = chosen_nll_term(loss, metrics, pol_c, n_c, cfg.sft_weight)
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
