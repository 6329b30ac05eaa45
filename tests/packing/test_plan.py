"""Micro-batch planner and sharing statistics: exact plans for a hand-worked case, the budget on random
ETO-shaped pairs (checked against the packer's real sizes), oversized records, determinism."""

from __future__ import annotations

import pytest
from test_tree import eto_pairs

from fasteto.data.tokenized import TokenizedPair, TokenizedSequence
from fasteto.packing import pack_pairs, pack_sequences, packed_size, plan_micro_batches, sharing_stats

F, T = False, True

# pa and pc share the prompt [1, 2, 3] and chosen [4]; pb shares nothing.
PA = TokenizedPair("a", [1, 2, 3], [4], [T], [5], [T])  # alone: [1 2 3 4], [1 2 3 5] -> 5 tokens
PB = TokenizedPair("b", [9, 9], [8], [T], [7], [T])  # alone: 4 tokens
PC = TokenizedPair("c", [1, 2, 3], [4], [T], [6], [T])  # alone 5; with pa it adds only [6]: 6 together


def test_packed_size_is_the_packers_size() -> None:
    assert packed_size([PA]) == 5 and packed_size([PA, PC]) == 6 and packed_size([PA, PB, PC]) == 10
    assert packed_size([PA, PC], share_across=False) == 10
    for records in ([PA], [PA, PC], [PA, PB, PC]):
        for share in (True, False):
            packed, _, _ = pack_pairs(records, share_across=share)
            assert packed_size(records, share_across=share) == packed.num_tokens


def test_plan_exact() -> None:
    records = [PA, PB, PC]
    # sorted by tokens: pa, pc ([1 2 3 4 ...]) then pb ([9 9 ...]); pa + pc = 6 fits 7, pb (+4) does not
    assert plan_micro_batches(records, 7) == [[0, 2], [1]]
    # given order: pa (5) + pb (4) = 9 > 7, pb + pc = 9 > 7
    assert plan_micro_batches(records, 7, sort=False) == [[0], [1], [2]]
    # without sharing across pairs pa + pc = 10 > 7
    assert plan_micro_batches(records, 7, share_across=False) == [[0], [2], [1]]
    assert plan_micro_batches(records, 10) == [[0, 2, 1]]
    assert plan_micro_batches(records, 10, sort=False) == [[0, 1, 2]]
    assert plan_micro_batches(records, 9, sort=False) == [[0, 1], [2]]
    assert plan_micro_batches([], 7) == []


def test_plan_sequences() -> None:
    seqs = [TokenizedSequence("x", [1, 2, 3], [F, T, T]), TokenizedSequence("y", [1, 2, 4], [F, T, T]),
            TokenizedSequence("z", [5, 6], [F, T])]
    assert plan_micro_batches(seqs, 4) == [[0, 1], [2]]  # [1 2 3] + [4] = 4 tokens
    assert plan_micro_batches(seqs, 4, share_across=False) == [[0], [1], [2]]
    assert pack_sequences([seqs[0], seqs[1]]).num_tokens == 4


def test_oversized_record_names_itself_and_the_fix() -> None:
    with pytest.raises(ValueError, match=r"pair 'a' alone packs to 5 tokens, more than token_budget=4\. "
                                         r"Fix: raise the token budget, or lower the maximum length "
                                         r"\(max_prompt / max_target\)"):
        plan_micro_batches([PB, PA], 4)
    with pytest.raises(ValueError, match=r"sequence 'long' alone packs to 3 tokens.*\(max_length\)"):
        plan_micro_batches([TokenizedSequence("long", [1, 2, 3], [F, T, T])], 2)


@pytest.mark.parametrize("budget", [0, -3, 2.5, True, None])
def test_bad_budget(budget) -> None:
    with pytest.raises(ValueError, match="token_budget must be a positive integer"):
        plan_micro_batches([PA], budget)


def test_bad_record_type() -> None:
    with pytest.raises(TypeError, match="cannot plan a dict"):
        plan_micro_batches([{"id": 1}], 8)


@pytest.mark.parametrize(("seed", "budget", "share_across", "sort"), [
    (0, 40, True, True), (1, 25, True, True), (2, 60, False, True), (3, 33, True, False),
    (4, 200, True, True),
])
def test_plan_respects_budget_and_places_every_record_once(seed, budget, share_across, sort) -> None:
    pairs = eto_pairs(seed, n_pairs=40)
    budget = max(budget, max(packed_size([p], share_across=share_across) for p in pairs))
    plan = plan_micro_batches(pairs, budget, share_across=share_across, sort=sort)
    assert sorted(i for batch in plan for i in batch) == list(range(len(pairs)))
    if not sort:
        assert [i for batch in plan for i in batch] == list(range(len(pairs)))
    for batch in plan:
        packed, _, _ = pack_pairs([pairs[i] for i in batch], share_across=share_across)
        assert packed.num_tokens <= budget
        assert packed.num_tokens == packed_size([pairs[i] for i in batch], share_across=share_across)
    # greedy: the next record did not fit, so no micro-batch could have taken the next one's first
    for batch, following in zip(plan[:-1], plan[1:], strict=True):
        with_next = [pairs[i] for i in batch + following[:1]]
        assert packed_size(with_next, share_across=share_across) > budget
    assert plan_micro_batches(pairs, budget, share_across=share_across, sort=sort) == plan


def test_sharing_stats_exact() -> None:
    records = [PA, PB, PC]
    # plain: 4 + 4 + 3 + 3 + 4 + 4 = 22; one tree: 10; padded: 6 rows x 4
    one = sharing_stats(records)
    assert (one.records, one.sequences, one.micro_batches) == (3, 6, 1)
    assert (one.plain_tokens, one.packed_tokens, one.padded_tokens) == (22, 10, 24)
    assert one.saved_fraction == pytest.approx(12 / 22) and one.padded_over_packed == pytest.approx(2.4)
    split = sharing_stats(records, [[0, 2], [1]])
    assert (split.packed_tokens, split.padded_tokens, split.micro_batches) == (10, 4 * 4 + 2 * 3, 2)
    alone = sharing_stats(records, [[0], [1], [2]], share_across=False)
    assert (alone.packed_tokens, alone.padded_tokens) == (14, 2 * 4 + 2 * 3 + 2 * 4)
    assert "22 plain tokens, 10 packed (54.5% saved), 24 padded (2.40x packed)" in one.summary()
    assert one.as_dict()["saved_fraction"] == pytest.approx(12 / 22)
