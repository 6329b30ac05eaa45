"""Padded layout (exact tensors), per-token / per-sequence log-probs against an unpadded manual loop,
and the reference log-prob file."""

from __future__ import annotations

import contextlib
import json
import math

import pytest
import torch
from tiny import tiny_llama
from transformers import LlamaForCausalLM

from fasteto.data.tokenized import TokenizedPair, TokenizedSequence
from fasteto.trainer.batching import epoch_order, micro_batches, pad_pairs, pad_sequences
from fasteto.trainer.logprobs import (
    autocast_context,
    load_reference,
    reference_logps,
    save_reference,
    sequence_logps,
    token_logps,
)

F, T = False, True


# ---------------------------------------------------------------- batching


def test_pad_sequences_exact() -> None:
    seqs = [
        TokenizedSequence("a", [5, 6, 7], [F, T, T]),
        TokenizedSequence("b", [8, 9, 10, 11, 12], [F, F, T, F, T]),
        TokenizedSequence("c", [13], [F]),
    ]
    out = pad_sequences(seqs, pad_id=0)
    assert torch.equal(
        out["input_ids"], torch.tensor([[5, 6, 7, 0, 0], [8, 9, 10, 11, 12], [13, 0, 0, 0, 0]])
    )
    assert torch.equal(
        out["loss_mask"], torch.tensor([[F, T, T, F, F], [F, F, T, F, T], [F, F, F, F, F]], dtype=torch.bool)
    )
    assert torch.equal(
        out["attention_mask"], torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
    )
    with pytest.raises(ValueError, match="row 0: 2 token ids but 1 mask"):
        pad_sequences([TokenizedSequence("x", [1, 2], [T])], 0)


def test_pad_pairs_exact() -> None:
    pairs = [
        # chosen longer than rejected; identical first continuation token
        TokenizedPair("p0", [1, 2], [3, 4, 5], [T, F, T], [3], [T]),
        # empty prompt; rejected longer than chosen
        TokenizedPair("p1", [], [6], [T], [7, 8, 9, 10], [T, T, F, T]),
    ]
    out = pad_pairs(pairs, pad_id=63)
    # rows: chosen p0, chosen p1, rejected p0, rejected p1; T = max(5, 1, 3, 4) = 5
    assert torch.equal(
        out["input_ids"],
        torch.tensor([[1, 2, 3, 4, 5], [6, 63, 63, 63, 63], [1, 2, 3, 63, 63], [7, 8, 9, 10, 63]]),
    )
    assert torch.equal(
        out["loss_mask"],
        torch.tensor([[F, F, T, F, T], [T, F, F, F, F], [F, F, T, F, F], [T, T, F, T, F]], dtype=torch.bool),
    )
    assert torch.equal(
        out["attention_mask"],
        torch.tensor([[1, 1, 1, 1, 1], [1, 0, 0, 0, 0], [1, 1, 1, 0, 0], [1, 1, 1, 1, 0]]),
    )


def test_micro_batches_and_epoch_order() -> None:
    assert micro_batches([1, 2, 3, 4, 5], 2) == [[1, 2], [3, 4], [5]]
    assert micro_batches([1, 2], 4) == [[1, 2]]
    assert micro_batches([], 3) == []
    with pytest.raises(ValueError):
        micro_batches([1], 0)
    order = epoch_order(10, seed=3, epoch=0)
    assert sorted(order) == list(range(10))
    assert order == epoch_order(10, seed=3, epoch=0)  # deterministic
    assert order != epoch_order(10, seed=3, epoch=1)  # a fresh shuffle each epoch
    assert order != epoch_order(10, seed=4, epoch=0)


# ---------------------------------------------------------------- log-probs


def test_token_logps_by_hand() -> None:
    # vocabulary 2; logits [0, ln 3] → probabilities (1/4, 3/4)
    logits = torch.tensor([[[0.0, math.log(3)], [math.log(3), 0.0], [9.0, 9.0]]])
    ids = torch.tensor([[1, 1, 0]])
    # t=1: token 1 from row 0 → log 3/4; t=2: token 0 from row 1 → log 3/4; t=0 → 0 by convention
    torch.testing.assert_close(
        token_logps(logits, ids), torch.tensor([[0.0, math.log(0.75), math.log(0.75)]])
    )


def _manual_logp(model: LlamaForCausalLM, ids: list[int], mask: list[bool]) -> tuple[float, int]:
    """One sequence alone, no padding, a Python loop over positions."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0].double()
    total, n = 0.0, 0
    for t in range(1, len(ids)):
        if mask[t]:
            total += torch.log_softmax(logits[t - 1], dim=-1)[ids[t]].item()
            n += 1
    return total, n


def _random_seqs(lengths: list[int], seed: int) -> list[TokenizedSequence]:
    g = torch.Generator().manual_seed(seed)
    seqs = []
    for i, n in enumerate(lengths):
        ids = torch.randint(1, 64, (n,), generator=g).tolist()
        mask = (torch.rand(n, generator=g) < 0.6).tolist()
        mask[-1] = True
        seqs.append(TokenizedSequence(f"s{i}", ids, mask))
    return seqs


def test_sequence_logps_match_unpadded_loop() -> None:
    model = tiny_llama()
    seqs = _random_seqs([7, 13, 2, 11], seed=1)
    for pad_id in (0, 17):  # the pad id must not matter
        batch = pad_sequences(seqs, pad_id)
        with torch.no_grad():
            logp, n = sequence_logps(model, batch["input_ids"], batch["loss_mask"], batch["attention_mask"])
        assert logp.dtype == torch.float32 and logp.shape == (4,)
        manual = [_manual_logp(model, s.input_ids, s.loss_mask) for s in seqs]
        torch.testing.assert_close(logp, torch.tensor([m[0] for m in manual]), rtol=1e-5, atol=1e-5)
        assert n.tolist() == [m[1] for m in manual]


def _random_pairs(seed: int) -> list[TokenizedPair]:
    seqs = _random_seqs([4, 6, 3, 9, 5, 2], seed)
    return [
        TokenizedPair(f"pair{i}", seqs[i].input_ids, seqs[i + 1].input_ids, seqs[i + 1].loss_mask,
                      seqs[i + 2].input_ids, seqs[i + 2].loss_mask)
        for i in range(0, 4)
    ]  # fmt: skip


def test_reference_logps_and_file_round_trip(tmp_path) -> None:
    model = tiny_llama(seed=2).train()
    pairs = _random_pairs(seed=5)
    ref = reference_logps(model, pairs, pad_id=0, micro_batch_size=3)  # micro-batches of 3 and 1
    assert model.training  # mode restored
    assert sorted(ref) == [0, 1, 2, 3]
    for i, p in enumerate(pairs):
        c, _ = _manual_logp(model, p.prompt_ids + p.chosen_ids, [F] * len(p.prompt_ids) + p.chosen_mask)
        r, _ = _manual_logp(model, p.prompt_ids + p.rejected_ids, [F] * len(p.prompt_ids) + p.rejected_mask)
        assert ref[i] == (pytest.approx(c, abs=1e-5), pytest.approx(r, abs=1e-5))

    path = tmp_path / "ref" / "reference.json"
    save_reference(path, ref, pairs)
    assert load_reference(path, pairs) == ref  # exact: JSON floats round-trip
    assert json.loads(path.read_text())["entries"][1]["id"] == "pair1"
    swapped = [pairs[1], pairs[0], *pairs[2:]]
    with pytest.raises(ValueError, match="entry 0 was computed for pair id 'pair0'"):
        load_reference(path, swapped)


def test_bf16_autocast_choice_and_float32_output() -> None:
    cpu = torch.device("cpu")
    assert isinstance(autocast_context(cpu, "auto"), contextlib.nullcontext)  # auto: CUDA only
    assert isinstance(autocast_context(cpu, False), contextlib.nullcontext)
    with pytest.raises(ValueError, match="bf16 must be"):
        autocast_context(cpu, "yes")
    model = tiny_llama()
    batch = pad_sequences(_random_seqs([6, 9], seed=4), 0)
    with torch.no_grad():
        full, _ = sequence_logps(model, batch["input_ids"], batch["loss_mask"], batch["attention_mask"])
        with autocast_context(cpu, True):
            half, _ = sequence_logps(model, batch["input_ids"], batch["loss_mask"], batch["attention_mask"])
    assert half.dtype == torch.float32  # log-softmax is taken in float32 even under autocast
    assert not torch.equal(half, full)  # bf16 really ran
    torch.testing.assert_close(half, full, rtol=2e-2, atol=0.1)
