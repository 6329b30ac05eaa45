"""Reference log-probs on the packed layout (``fasteto.models.packed``): the DPO reference pass of the fast
trainer, in eval mode without gradients."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from fasteto.data.tokenized import TokenizedPair
from fasteto.models.packed import PackedLogps
from fasteto.packing import pack_pairs, plan_micro_batches
from fasteto.trainer.logprobs import autocast_context, model_device


@torch.no_grad()
def reference_logps_packed(
    model: nn.Module,
    pairs: Sequence[TokenizedPair],
    token_budget: int,
    bf16: bool | str = "auto",
    *,
    attn_impl: str = "auto",
    logprob_impl: str = "auto",
) -> dict[int, tuple[float, float]]:
    """``logprobs.reference_logps`` on the packed layout: pairs are cut into micro-batches of at most
    ``token_budget`` packed tokens (``plan_micro_batches``; sharing across pairs), each run once in eval
    mode without gradients.

    Returns:
        ``{pair index in pairs: (chosen_logp, rejected_logp)}`` as Python floats (float32 values).
    """
    runner = model if isinstance(model, PackedLogps) else PackedLogps(model)
    was_training = runner.training
    runner.eval()
    device = model_device(runner)
    out: dict[int, tuple[float, float]] = {}
    try:
        for chunk in plan_micro_batches(pairs, token_budget):
            batch, chosen, rejected = pack_pairs([pairs[i] for i in chunk])
            with autocast_context(device, bf16):
                sums, _ = runner(batch.to(device), attn_impl, logprob_impl)
            sums = sums.float().cpu()
            for j, i in enumerate(chunk):
                out[i] = (float(sums[chosen[j]]), float(sums[rejected[j]]))
    finally:
        runner.train(was_training)
    return out
