"""Pairwise preference losses (ETO's DPO stage and its variants), on summed per-sequence log-probs.

Every loss takes the *summed* log-probs of the policy and of the frozen reference, for the chosen and the
rejected continuation of each pair (``[P]`` float tensors, e.g. ``PackedBatch.sequence_sums`` of
:func:`fasteto.ops.fused_token_logprobs`), and returns ``(loss, metrics)``: the loss is the mean over the
pairs it is given; metrics are detached 0-dim float32 tensors, means over the same pairs:

- ``rewards/chosen``   = mean β·(π_c − ref_c)  (the implicit DPO reward of the chosen continuation)
- ``rewards/rejected`` = mean β·(π_r − ref_r)
- ``rewards/accuracy`` = fraction of pairs with reward chosen > reward rejected (strict)
- ``rewards/margin``   = mean (reward chosen − reward rejected)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

Metrics = dict[str, torch.Tensor]


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


def chosen_nll_term(loss: torch.Tensor, metrics: Metrics, pol_c: torch.Tensor, n_c: torch.Tensor,
                    weight: float) -> tuple[torch.Tensor, Metrics]:
    """A preference loss plus ``weight`` times the chosen side's negative log-likelihood per model token
    (RPO: Pang et al. 2024, "Iterative Reasoning Preference Optimization", arXiv 2404.19733):

    loss + weight · mean_i(−π_c[i] / n_c[i])

    It keeps the chosen (expert) continuation likely while the pair's margin grows; DPO alone can lower
    both sides. Args: ``loss`` and ``metrics`` from ``preference_loss``; ``pol_c`` ``[N]`` summed chosen
    log-probs; ``n_c`` ``[N]`` their model-token counts; ``weight`` ≥ 0. Adds metric ``nll/chosen`` (the
    mean NLL per token, before the weight)."""
    nll = (-pol_c.float() / n_c.float()).mean()
    return loss + weight * nll, {**metrics, "nll/chosen": nll.detach()}
