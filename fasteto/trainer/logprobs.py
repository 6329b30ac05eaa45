"""Per-token and per-sequence log-probs on the plain padded layout, and the DPO reference log-probs.

Shift convention: for a sequence ``x``, the log-prob of token ``t`` is ``log softmax(logits[t-1])[x[t]]``.
``loss_mask[t]`` says whether token ``t`` is a model token; token 0 has no prediction and never counts.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Sequence

import torch

from fasteto.data.tokenized import TokenizedPair
from fasteto.trainer.batching import micro_batches, pad_pairs
from fasteto.utils.choices import record_choice
from fasteto.utils.io import atomic_write_json

REFERENCE_FORMAT = "fasteto.reference_logps.v1"


def autocast_context(device: torch.device, bf16: bool | str = "auto") -> contextlib.AbstractContextManager:
    """``torch.autocast(bfloat16)`` or a no-op. ``"auto"``: only on CUDA with bf16 support; ``True``: on
    whatever device the model is on (CPU included); ``False``: never."""
    if bf16 == "auto":
        bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        why = "CUDA with bf16" if bf16 else f"{device.type}: bf16 autocast only on CUDA with bf16 support"
        record_choice(f"bf16 autocast ({device.type})", str(bf16), why)
    elif not isinstance(bf16, bool):
        raise ValueError(f"bf16 must be True, False or 'auto', got {bf16!r}")
    if bf16:
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def token_logps(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Log-prob of every token given the ones before it.

    Args:
        logits: ``[B, T, V]`` any float dtype (upcast to float32 here).
        input_ids: ``[B, T]`` long.

    Returns:
        ``[B, T]`` float32; entry ``t ≥ 1`` is ``log_softmax(logits[:, t-1])[input_ids[:, t]]``, entry 0 is 0.
    """
    logps = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    picked = logps.gather(-1, input_ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    return torch.nn.functional.pad(picked, (1, 0), value=0.0)


def sequence_logps(
    model: torch.nn.Module, input_ids: torch.Tensor, loss_mask: torch.Tensor, attention_mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-prob of the model tokens of each row of a right-padded batch.

    Args:
        model: a causal LM whose forward returns ``.logits`` ``[B, T, V]``.
        input_ids: ``[B, T]`` long. loss_mask: ``[B, T]`` bool. attention_mask: ``[B, T]`` long/bool.

    Returns:
        ``sum_logp`` ``[B]`` float32 (Σ over masked positions ``t ≥ 1``), ``n_tokens`` ``[B]`` long.
    """
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
    mask = loss_mask.clone()
    mask[:, 0] = False
    logps = token_logps(logits, input_ids)
    return (logps * mask).sum(-1), mask.sum(-1)


@torch.no_grad()
def reference_logps(
    model: torch.nn.Module,
    pairs: Sequence[TokenizedPair],
    pad_id: int,
    micro_batch_size: int,
    bf16: bool | str = "auto",
) -> dict[int, tuple[float, float]]:
    """The reference model's summed log-probs of every pair's chosen and rejected continuation.

    Computed once before a DPO iteration (eval mode, no grad) so the reference model need not stay in
    memory while the policy trains. Use the same ``bf16`` setting as the training run so that the policy
    starts with log-ratios of zero.

    Returns:
        ``{pair index in pairs: (chosen_logp, rejected_logp)}`` as Python floats (float32 values).
    """
    was_training = model.training
    model.eval()
    device = model_device(model)
    out: dict[int, tuple[float, float]] = {}
    try:
        for chunk in micro_batches(list(range(len(pairs))), micro_batch_size):
            batch = {k: v.to(device) for k, v in pad_pairs([pairs[i] for i in chunk], pad_id).items()}
            with autocast_context(device, bf16):
                logp, _ = sequence_logps(
                    model, batch["input_ids"], batch["loss_mask"], batch["attention_mask"]
                )
            logp = logp.float().cpu().tolist()
            for j, i in enumerate(chunk):
                out[i] = (logp[j], logp[j + len(chunk)])
    finally:
        model.train(was_training)
    return out


def save_reference(
    path: str | os.PathLike, ref: dict[int, tuple[float, float]], pairs: Sequence[TokenizedPair] | None = None
) -> None:
    """Write reference log-probs as JSON, atomically. With ``pairs``, each entry also records the pair's id
    (as a string) so ``load_reference`` can check that the file belongs to the same pair list."""
    entries = []
    for i in sorted(ref):
        entry = {"index": i, "chosen": ref[i][0], "rejected": ref[i][1]}
        if pairs is not None:
            entry["id"] = str(pairs[i].id)
        entries.append(entry)
    atomic_write_json(path, {"format": REFERENCE_FORMAT, "entries": entries}, indent=None)


def load_reference(
    path: str | os.PathLike, pairs: Sequence[TokenizedPair] | None = None
) -> dict[int, tuple[float, float]]:
    """Read a file written by ``save_reference``. Floats round-trip exactly through JSON. With ``pairs``,
    recorded ids must match ``str(pairs[index].id)``, else ValueError naming the first mismatch."""
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    if data.get("format") != REFERENCE_FORMAT:
        raise ValueError(f"{path}: not a reference log-prob file (format {data.get('format')!r})")
    out: dict[int, tuple[float, float]] = {}
    for e in data["entries"]:
        i = int(e["index"])
        if pairs is not None and "id" in e and (i >= len(pairs) or str(pairs[i].id) != e["id"]):
            got = str(pairs[i].id) if i < len(pairs) else "no such pair"
            raise ValueError(
                f"{path}: entry {i} was computed for pair id {e['id']!r} but the pair list has {got!r}; "
                "recompute the reference log-probs for this pair list"
            )
        out[i] = (float(e["chosen"]), float(e["rejected"]))
    return out
