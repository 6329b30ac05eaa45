"""Training losses: SFT cross-entropy and the pairwise preference losses of ETO's DPO stage.

Every preference loss takes *summed* per-sequence log-probs (see ``logprobs.sequence_logps``) of the
policy and of the frozen reference, for the chosen and the rejected continuation of each pair, and
returns ``(loss, metrics)``: the loss is the mean over the pairs it is given; metrics are detached 0-dim
float32 tensors, means over the same pairs:

- ``rewards/chosen``   = mean β·(π_c − ref_c)  (the implicit DPO reward of the chosen continuation)
- ``rewards/rejected`` = mean β·(π_r − ref_r)
- ``rewards/accuracy`` = fraction of pairs with reward chosen > reward rejected (strict)
- ``rewards/margin``   = mean (reward chosen − reward rejected)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fasteto.trainer.logprobs import token_logps

Metrics = dict[str, torch.Tensor]


def sft_loss(
    logits_or_logps: torch.Tensor,
    loss_mask: torch.Tensor,
    num_tokens: int | torch.Tensor | None = None,
    input_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Cross-entropy on model tokens only (behavioural cloning, ETO step 1).

    loss = −Σ_{b,t: mask[b,t]} log p(x[b,t] | x[b,<t]) / num_tokens

    Args:
        logits_or_logps: either logits ``[B, T, V]`` (any float dtype; then ``input_ids`` is required)
            or per-token target log-probs ``[B, T]`` float32 as returned by ``logprobs.token_logps``
            (entry ``t`` is the log-prob of token ``t``; column 0 is unused).
        loss_mask: ``[B, T]`` bool, True on model tokens. Position 0 has no prediction and never counts.
        num_tokens: the normaliser. Pass the number of model tokens (positions ≥ 1) of the whole *global*
            batch: each micro-batch then contributes its token sum / global count, and accumulating the
            micro-batch gradients gives exactly the gradient of one big batch's token mean. ``None``
            means this micro-batch's own count (a plain token mean).
        input_ids: ``[B, T]`` long, only with logits.

    Returns:
        0-dim float32 loss. A batch with no model tokens gives NaN when ``num_tokens`` is None.
    """
    if logits_or_logps.dim() == 3:
        if input_ids is None:
            raise ValueError("sft_loss got logits [B, T, V]: pass input_ids [B, T] too")
        logps = token_logps(logits_or_logps, input_ids)
    elif logits_or_logps.dim() == 2:
        logps = logits_or_logps.float()
    else:
        raise ValueError(
            f"sft_loss wants logits [B, T, V] or token log-probs [B, T], got {tuple(logits_or_logps.shape)}"
        )
    mask = loss_mask.clone()
    mask[:, 0] = False
    if num_tokens is None:
        num_tokens = mask.sum()
    return -(logps * mask).sum() / num_tokens


def _reward_metrics(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> Metrics:
    chosen_rewards, rejected_rewards = chosen_rewards.detach().float(), rejected_rewards.detach().float()
    return {
        "rewards/chosen": chosen_rewards.mean(),
        "rewards/rejected": rejected_rewards.mean(),
        "rewards/accuracy": (chosen_rewards > rejected_rewards).float().mean(),
        "rewards/margin": (chosen_rewards - rejected_rewards).mean(),
    }


def dpo_sigmoid_loss(
    pol_c: torch.Tensor, pol_r: torch.Tensor, ref_c: torch.Tensor, ref_r: torch.Tensor, beta: float
) -> tuple[torch.Tensor, Metrics]:
    """Sigmoid DPO loss (Rafailov et al. 2023, "Direct Preference Optimization", arXiv 2305.18290).

    loss = −log σ(β·((π_c − ref_c) − (π_r − ref_r)))

    Args:
        pol_c, pol_r: ``[N]`` float32, policy summed log-probs of chosen / rejected continuations.
        ref_c, ref_r: ``[N]`` float32, the same under the reference model (no gradient needed).
        beta: β, the strength of the KL tie to the reference (ETO: 0.1 in iteration 1, 0.5 later).

    Returns:
        (0-dim float32 mean loss over the N pairs, metrics as in the module docstring).
    """
    chosen_rewards = beta * (pol_c.float() - ref_c.float())
    rejected_rewards = beta * (pol_r.float() - ref_r.float())
    loss = -F.logsigmoid(chosen_rewards - rejected_rewards).mean()
    return loss, _reward_metrics(chosen_rewards, rejected_rewards)


def ipo_loss(
    pol_c: torch.Tensor, pol_r: torch.Tensor, ref_c: torch.Tensor, ref_r: torch.Tensor, beta: float
) -> tuple[torch.Tensor, Metrics]:
    """IPO loss (Azar et al. 2023, "A General Theoretical Paradigm to Understand Learning from Human
    Preferences", arXiv 2310.12036, eq. 17), on summed log-probs as torchtune does:

    loss = ((π_c − ref_c) − (π_r − ref_r) − 1/(2β))²

    It regresses the log-ratio margin onto 1/(2β) instead of pushing it to infinity. Shapes and returns as
    in ``dpo_sigmoid_loss``; rewards are still reported as β·(π − ref).
    """
    chosen_logratio = pol_c.float() - ref_c.float()
    rejected_logratio = pol_r.float() - ref_r.float()
    loss = ((chosen_logratio - rejected_logratio - 1.0 / (2.0 * beta)) ** 2).mean()
    return loss, _reward_metrics(beta * chosen_logratio, beta * rejected_logratio)


def dpo_sigmoid_norm_loss(
    pol_c: torch.Tensor,
    pol_r: torch.Tensor,
    ref_c: torch.Tensor,
    ref_r: torch.Tensor,
    beta: float,
    n_c: torch.Tensor,
    n_r: torch.Tensor,
) -> tuple[torch.Tensor, Metrics]:
    """Length-normalised sigmoid DPO: every log-prob is divided by its continuation's number of model
    tokens before the sigmoid loss, so long rejected trajectories (ETO's explored ones can run 10
    messages past the expert) do not win or lose on length alone:

    loss = −log σ(β·((π_c − ref_c)/n_c − (π_r − ref_r)/n_r))

    Args:
        pol_c, pol_r, ref_c, ref_r, beta: as in ``dpo_sigmoid_loss``.
        n_c, n_r: ``[N]`` int or float, model-token counts of chosen / rejected (≥ 1).

    Returns:
        As ``dpo_sigmoid_loss``; rewards are the normalised β·(π − ref)/n.
    """
    n_c, n_r = n_c.float().clamp(min=1.0), n_r.float().clamp(min=1.0)
    return dpo_sigmoid_loss(
        pol_c.float() / n_c, pol_r.float() / n_r, ref_c.float() / n_c, ref_r.float() / n_r, beta
    )


def hinge_loss(
    pol_c: torch.Tensor, pol_r: torch.Tensor, ref_c: torch.Tensor, ref_r: torch.Tensor, beta: float
) -> tuple[torch.Tensor, Metrics]:
    """Hinge loss on the DPO log-ratio margin, as SLiC-HF's calibration loss (Zhao et al. 2023,
    "SLiC-HF: Sequence Likelihood Calibration with Human Feedback", arXiv 2305.10425) with the reference
    log-ratio subtracted, as TRL's ``loss_type="hinge"``:

    loss = max(0, 1 − β·((π_c − ref_c) − (π_r − ref_r)))

    A pair stops contributing once its β-scaled margin reaches 1. Shapes and returns as in
    ``dpo_sigmoid_loss``; rewards are β·(π − ref).
    """
    chosen_rewards = beta * (pol_c.float() - ref_c.float())
    rejected_rewards = beta * (pol_r.float() - ref_r.float())
    loss = torch.relu(1.0 - (chosen_rewards - rejected_rewards)).mean()
    return loss, _reward_metrics(chosen_rewards, rejected_rewards)


PREFERENCE_LOSSES = ("sigmoid", "ipo", "sigmoid_norm", "hinge")


def preference_loss(
    name: str,
    pol_c: torch.Tensor,
    pol_r: torch.Tensor,
    ref_c: torch.Tensor,
    ref_r: torch.Tensor,
    beta: float,
    n_c: torch.Tensor,
    n_r: torch.Tensor,
) -> tuple[torch.Tensor, Metrics]:
    """The loss ``TrainConfig.loss`` names: one of ``PREFERENCE_LOSSES`` (token counts are used only by
    "sigmoid_norm")."""
    if name == "sigmoid":
        return dpo_sigmoid_loss(pol_c, pol_r, ref_c, ref_r, beta)
    if name == "ipo":
        return ipo_loss(pol_c, pol_r, ref_c, ref_r, beta)
    if name == "sigmoid_norm":
        return dpo_sigmoid_norm_loss(pol_c, pol_r, ref_c, ref_r, beta, n_c, n_r)
    if name == "hinge":
        return hinge_loss(pol_c, pol_r, ref_c, ref_r, beta)
    raise ValueError(f"unknown preference loss {name!r}: choose one of {', '.join(PREFERENCE_LOSSES)}")
