"""Losses against values worked out by hand (arithmetic in the comments)."""

from __future__ import annotations

import math

import pytest
import torch

from fasteto.trainer.losses import (
    chosen_nll_term,
    dpo_sigmoid_loss,
    dpo_sigmoid_norm_loss,
    hinge_loss,
    ipo_loss,
    preference_loss,
    sft_loss,
)

# Two pairs, β = 0.1.
#   pair 0: π_c = −3, π_r = −5, ref_c = −4, ref_r = −4
#           chosen log-ratio −3 − (−4) = 1, rejected log-ratio −5 − (−4) = −1, difference 1 − (−1) = 2
#           rewards: chosen 0.1·1 = 0.1, rejected 0.1·(−1) = −0.1, margin 0.2
#           loss log(1 + e^{−0.2}) = 0.598139
#   pair 1: π_c = −6, π_r = −2, ref_c = −5.5, ref_r = −2.5
#           chosen log-ratio −0.5, rejected log-ratio 0.5, difference −1
#           rewards: chosen −0.05, rejected 0.05, margin −0.1 → loss log(1 + e^{0.1}) = 0.744397
POL_C, POL_R = [-3.0, -6.0], [-5.0, -2.0]
REF_C, REF_R = [-4.0, -5.5], [-4.0, -2.5]
BETA = 0.1


def _t(values: list[float], grad: bool = False) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32, requires_grad=grad)


def test_dpo_sigmoid_by_hand() -> None:
    pol_c = _t(POL_C, grad=True)
    loss, m = dpo_sigmoid_loss(pol_c, _t(POL_R), _t(REF_C), _t(REF_R), BETA)
    expected = (math.log1p(math.exp(-0.2)) + math.log1p(math.exp(0.1))) / 2  # = 0.671268
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert m["rewards/chosen"].item() == pytest.approx(0.025, abs=1e-7)  # (0.1 − 0.05)/2
    assert m["rewards/rejected"].item() == pytest.approx(-0.025, abs=1e-7)  # (−0.1 + 0.05)/2
    assert m["rewards/margin"].item() == pytest.approx(0.05, abs=1e-7)  # (0.2 − 0.1)/2
    assert m["rewards/accuracy"].item() == 0.5  # pair 0 right, pair 1 wrong
    # d/dπ_c of −log σ(βz)/N is −β·σ(−βz)/N:  pair 0: −0.1·σ(−0.2)/2, pair 1: −0.1·σ(0.1)/2
    loss.backward()
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    torch.testing.assert_close(pol_c.grad, _t([-0.1 * sig(-0.2) / 2, -0.1 * sig(0.1) / 2]))


def test_dpo_sigmoid_single_pair_beta_half() -> None:
    # β = 0.5, pair 0 alone: difference 2 → β·2 = 1 → loss log(1 + e^{−1}) = 0.313262
    loss, m = dpo_sigmoid_loss(_t([-3.0]), _t([-5.0]), _t([-4.0]), _t([-4.0]), 0.5)
    assert loss.item() == pytest.approx(math.log1p(math.exp(-1.0)), abs=1e-6)
    assert m["rewards/chosen"].item() == pytest.approx(0.5)  # 0.5·1
    assert m["rewards/rejected"].item() == pytest.approx(-0.5)  # 0.5·(−1)
    assert m["rewards/accuracy"].item() == 1.0


def test_policy_equal_to_reference_gives_log2() -> None:
    # All log-ratios 0 → loss −log σ(0) = log 2; rewards 0; accuracy 0 (strict comparison)
    x = _t([-7.5, -1.25, -3.0])
    loss, m = dpo_sigmoid_loss(x, x - 1, x, x - 1, 0.1)
    assert loss.item() == pytest.approx(math.log(2), abs=1e-7)
    assert m["rewards/accuracy"].item() == 0.0


def test_ipo_by_hand() -> None:
    # 1/(2β) = 1/0.2 = 5. pair 0: difference 2 → (2 − 5)² = 9; pair 1: difference −1 → (−1 − 5)² = 36
    # mean (9 + 36)/2 = 22.5; rewards as for DPO
    loss, m = ipo_loss(_t(POL_C), _t(POL_R), _t(REF_C), _t(REF_R), BETA)
    assert loss.item() == pytest.approx(22.5, abs=1e-5)
    assert m["rewards/margin"].item() == pytest.approx(0.05, abs=1e-7)
    assert m["rewards/accuracy"].item() == 0.5


def test_hinge_by_hand() -> None:
    # β = 0.1. pair 0: difference 2 → β·2 = 0.2 → max(0, 1 − 0.2) = 0.8
    #          pair 1: difference −1 → β·(−1) = −0.1 → max(0, 1 + 0.1) = 1.1;  mean (0.8 + 1.1)/2 = 0.95
    pol_c = _t(POL_C, grad=True)
    loss, m = hinge_loss(pol_c, _t(POL_R), _t(REF_C), _t(REF_R), BETA)
    assert loss.item() == pytest.approx(0.95, abs=1e-6)
    assert m["rewards/margin"].item() == pytest.approx(0.05, abs=1e-7)  # rewards as for DPO
    assert m["rewards/accuracy"].item() == 0.5
    # both pairs inside the hinge: d/dπ_c = −β/N = −0.1/2 each
    loss.backward()
    torch.testing.assert_close(pol_c.grad, _t([-0.05, -0.05]))
    # β = 1: pair 0 has margin 2 ≥ 1 → loss 0 and no gradient; pair 1: 1 − (−1) = 2 → mean (0 + 2)/2 = 1
    pol_c = _t(POL_C, grad=True)
    loss, _ = preference_loss("hinge", pol_c, _t(POL_R), _t(REF_C), _t(REF_R), 1.0, None, None)
    assert loss.item() == pytest.approx(1.0, abs=1e-6)
    loss.backward()
    torch.testing.assert_close(pol_c.grad, _t([0.0, -0.5]))


def test_length_normalised_by_hand() -> None:
    # pair 0 with n_c = 2, n_r = 4:
    #   chosen (−3/2) − (−4/2) = −1.5 + 2 = 0.5; rejected (−5/4) − (−4/4) = −1.25 + 1 = −0.25
    #   difference 0.75 → β·0.75 = 0.075 → loss log(1 + e^{−0.075}) = 0.656350
    #   rewards chosen 0.1·0.5 = 0.05, rejected 0.1·(−0.25) = −0.025
    n_c, n_r = torch.tensor([2]), torch.tensor([4])
    loss, m = dpo_sigmoid_norm_loss(_t([-3.0]), _t([-5.0]), _t([-4.0]), _t([-4.0]), BETA, n_c, n_r)
    assert loss.item() == pytest.approx(math.log1p(math.exp(-0.075)), abs=1e-6)
    assert m["rewards/chosen"].item() == pytest.approx(0.05, abs=1e-7)
    assert m["rewards/rejected"].item() == pytest.approx(-0.025, abs=1e-7)
    # through the dispatcher, and the other names
    loss2, _ = preference_loss("sigmoid_norm", _t([-3.0]), _t([-5.0]), _t([-4.0]), _t([-4.0]), BETA, n_c, n_r)
    assert loss2.item() == loss.item()
    loss3, _ = preference_loss("ipo", _t([-3.0]), _t([-5.0]), _t([-4.0]), _t([-4.0]), BETA, n_c, n_r)
    assert loss3.item() == pytest.approx(9.0)  # (2 − 5)²
    with pytest.raises(ValueError, match="unknown preference loss 'kto'"):
        preference_loss("kto", _t([-3.0]), _t([-5.0]), _t([-4.0]), _t([-4.0]), BETA, n_c, n_r)


def test_chosen_nll_term_by_hand() -> None:
    # the two pairs above, n_c = (2, 3): NLL per token 3/2 = 1.5 and 6/3 = 2 → mean 1.75
    #   sigmoid loss (0.598139 + 0.744397) / 2 = 0.671268; with weight 0.5: 0.671268 + 0.875 = 1.546268
    #   d/dπ_c: sigmoid part −β·σ(−margin_i)/2; NLL part 0.5 · (−1/n_c)/2 = −1/8 and −1/12
    pol_c = _t(POL_C, grad=True)
    loss, m = dpo_sigmoid_loss(pol_c, _t(POL_R), _t(REF_C), _t(REF_R), BETA)
    total, m2 = chosen_nll_term(loss, m, pol_c, torch.tensor([2, 3]), 0.5)
    assert total.item() == pytest.approx(0.671268 + 0.875, abs=1e-6)
    assert m2["nll/chosen"].item() == pytest.approx(1.75) and m2["rewards/margin"] is m["rewards/margin"]
    total.backward()
    sig = [1 / (1 + math.exp(0.2)), 1 / (1 + math.exp(-0.1))]  # σ(−margin) of each pair
    expected = [-BETA * sig[0] / 2 - 1 / 8, -BETA * sig[1] / 2 - 1 / 12]
    assert pol_c.grad.tolist() == pytest.approx(expected, abs=1e-6)


# SFT, vocabulary of 2. Row [a, ln 3] gives probabilities (1/4, 3/4) for tokens (0, 1) whatever a is
# (softmax is shift invariant, so a = 0 and the row [0, ln 3] + 0.7 mean the same).
LN3 = math.log(3)


def _sft_inputs() -> tuple[torch.Tensor, torch.Tensor]:
    # sequence 0: ids [0, 1, 0, 1]; logits at t predict token t+1
    #   t=0 [0, ln3] → token 1: log 3/4;  t=1 [0, ln3] → token 0: log 1/4;
    #   t=2 [ln3, 0] + 0.7 → token 1: log 1/4
    # sequence 1: ids [1, 1, 0, pad]; t=0 [ln3, 0] → token 1: log 1/4;  t=1 [0, ln3] → token 0: log 1/4
    logits = torch.tensor(
        [
            [[0.0, LN3], [0.0, LN3], [LN3 + 0.7, 0.7], [5.0, -5.0]],
            [[LN3, 0.0], [0.0, LN3], [1.0, 2.0], [3.0, 4.0]],
        ]
    )
    ids = torch.tensor([[0, 1, 0, 1], [1, 1, 0, 0]])
    return logits, ids


def test_sft_loss_by_hand() -> None:
    logits, ids = _sft_inputs()
    # mask: seq 0 tokens 1 and 3 (token 0 is True too but has no prediction and must be ignored);
    #       seq 1 token 2
    mask = torch.tensor([[True, True, False, True], [False, False, True, False]])
    # model tokens: log 3/4, log 1/4 (seq 0) and log 1/4 (seq 1) → 3 tokens
    # loss = −(log 3/4 + 2·log 1/4)/3 = (log 4/3 + 2·log 4)/3 = (0.287682 + 2.772589)/3 = 1.020090
    expected = (math.log(4 / 3) + 2 * math.log(4)) / 3
    assert sft_loss(logits, mask, input_ids=ids).item() == pytest.approx(expected, abs=1e-6)
    # a global normaliser of 6 tokens halves it
    assert sft_loss(logits, mask, num_tokens=6, input_ids=ids).item() == pytest.approx(expected / 2, abs=1e-6)


def test_sft_loss_accumulates_to_the_big_batch() -> None:
    logits, ids = _sft_inputs()
    mask = torch.tensor([[False, True, True, True], [False, True, True, False]])
    whole = sft_loss(logits, mask, input_ids=ids)
    # micro-batches of one row each, normalised by the global count 5 (3 + 2 tokens)
    parts = sum(
        sft_loss(logits[i : i + 1], mask[i : i + 1], num_tokens=5, input_ids=ids[i : i + 1]) for i in range(2)
    )
    torch.testing.assert_close(parts, whole)
    # a plain mean of the two micro means weights the rows wrongly: (3-token mean + 2-token mean)/2 ≠ whole
    naive = sum(sft_loss(logits[i : i + 1], mask[i : i + 1], input_ids=ids[i : i + 1]) for i in range(2)) / 2
    assert not torch.allclose(naive, whole)


def test_sft_loss_logits_and_logps_agree_and_need_ids() -> None:
    logits, ids = _sft_inputs()
    mask = torch.tensor([[False, True, True, True], [False, True, True, False]])
    from fasteto.trainer.logprobs import token_logps

    torch.testing.assert_close(
        sft_loss(token_logps(logits, ids), mask), sft_loss(logits, mask, input_ids=ids)
    )
    with pytest.raises(ValueError, match="pass input_ids"):
        sft_loss(logits, mask)
