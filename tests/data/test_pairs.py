"""ETO's pair rule, self-play pairs and the RFT set, against hand-written expected pairs."""

from __future__ import annotations

import pytest

from fasteto.data.pairs import (
    DEFAULT_MAX_EXTRA_MESSAGES,
    PairStats,
    build_pairs,
    build_rft_set,
    build_self_play_pairs,
    parse_max_extra,
)
from fasteto.data.types import GPT, HUMAN, Pair, Trajectory, message


def h(value: str) -> dict:
    return message(HUMAN, value)


def g(value: str) -> dict:
    return message(GPT, value)


# The expert and the explored trajectories get different instruction exchanges and task messages, so
# that each test also checks which side the prompt is taken from.
EXPERT_INST = [h("I"), g("OK")]
EXPLORED_INST = [h("Ix"), g("OKx")]


def expert(item_id, *rest, reward=None) -> Trajectory:
    return Trajectory(item_id, EXPERT_INST + list(rest), reward)


def explored(item_id, *rest, reward) -> Trajectory:
    return Trajectory(item_id, EXPLORED_INST + list(rest), reward)


# e = [T, a1, o1, a2] (len 4); x = [Tx, b1, p1, ..., p7, b8] (len 16, the trailing p8 dropped).
EXPERT_1 = expert("1", h("T"), g("a1"), h("o1"), g("a2"))
LONG_EXPLORED_1 = explored(
    "1", h("Tx"), g("b1"), h("p1"), g("b2"), h("p2"), g("b3"), h("p3"), g("b4"), h("p4"),
    g("b5"), h("p5"), g("b6"), h("p6"), g("b7"), h("p7"), g("b8"), h("p8"), reward=0.0,
)


# ------------------------------------------------------------------------------------------- lose


def test_lose_cut_two_extra_messages():
    pairs, stats = build_pairs([EXPERT_1], [LONG_EXPLORED_1], max_extra_messages=2)
    # x[:4 + 2] = [Tx, b1, p1, b2, p2, b3]
    assert pairs == [
        Pair("1", [h("I"), g("OK"), h("T")], [g("a1"), h("o1"), g("a2")],
             [g("b1"), h("p1"), g("b2"), h("p2"), g("b3")]),
    ]
    assert stats == PairStats(lose=1, written=1)


def test_lose_cut_ten_extra_messages():
    pairs, stats = build_pairs([EXPERT_1], [LONG_EXPLORED_1], max_extra_messages=10)
    # x[:4 + 10] = [Tx, b1, p1, ..., p6, b7]
    assert pairs == [
        Pair("1", [h("I"), g("OK"), h("T")], [g("a1"), h("o1"), g("a2")],
             [g("b1"), h("p1"), g("b2"), h("p2"), g("b3"), h("p3"), g("b4"), h("p4"),
              g("b5"), h("p5"), g("b6"), h("p6"), g("b7")]),
    ]
    assert stats == PairStats(lose=1, written=1)


def test_lose_no_cut_keeps_all_but_the_trailing_observation():
    pairs, stats = build_pairs([EXPERT_1], [LONG_EXPLORED_1], max_extra_messages=None)
    assert pairs == [
        Pair("1", [h("I"), g("OK"), h("T")], [g("a1"), h("o1"), g("a2")],
             [g("b1"), h("p1"), g("b2"), h("p2"), g("b3"), h("p3"), g("b4"), h("p4"),
              g("b5"), h("p5"), g("b6"), h("p6"), g("b7"), h("p7"), g("b8")]),
    ]
    assert stats == PairStats(lose=1, written=1)


def test_lose_cut_landing_on_an_observation_is_dropped():
    # x[:4 + 3] = [Tx, b1, p1, b2, p2, b3, p3]: rejected ends with the observation p3.
    pairs, stats = build_pairs([EXPERT_1], [LONG_EXPLORED_1], max_extra_messages=3)
    assert pairs == []
    assert stats == PairStats(lose=1, dropped_not_model_end=1, written=0)


def test_lose_cut_of_zero_keeps_the_expert_length():
    pairs, _ = build_pairs([EXPERT_1], [LONG_EXPLORED_1], max_extra_messages=0)
    assert pairs == [
        Pair("1", [h("I"), g("OK"), h("T")], [g("a1"), h("o1"), g("a2")], [g("b1"), h("p1"), g("b2")]),
    ]


def test_lose_explored_shorter_than_expert():
    exp = expert("7", h("T"), g("a1"), h("o1"), g("a2"), h("o2"), g("a3"))
    short = explored("7", h("Tx"), g("b1"), h("p1"), reward=0.0)
    pairs, stats = build_pairs([exp], [short], max_extra_messages=10)
    assert pairs == [
        Pair("7", [h("I"), g("OK"), h("T")], [g("a1"), h("o1"), g("a2"), h("o2"), g("a3")], [g("b1")]),
    ]
    assert stats == PairStats(lose=1, written=1)


def test_lose_identical_chosen_and_rejected_is_still_a_pair():
    same = Trajectory("2", EXPERT_INST + [h("T"), g("a1"), h("o1"), g("a2")], 0.0)
    pairs, stats = build_pairs([expert("2", h("T"), g("a1"), h("o1"), g("a2"))], [same], 10)
    assert pairs == [
        Pair("2", [h("I"), g("OK"), h("T")], [g("a1"), h("o1"), g("a2")], [g("a1"), h("o1"), g("a2")]),
    ]
    assert stats == PairStats(lose=1, written=1)


# -------------------------------------------------------------------------------------------- win


def test_win_takes_prompt_and_chosen_from_explored_and_never_cuts():
    exp = expert("5", h("T"), g("a1"), h("o1"), g("a2"), reward=0.8)
    # x = [Tx, b1, p1, b2, p2, b3] (trailing p3 dropped) is longer than len(e) + 0: no cut on a win.
    exp_long = explored("5", h("Tx"), g("b1"), h("p1"), g("b2"), h("p2"), g("b3"), h("p3"), reward=1.0)
    pairs, stats = build_pairs([exp], [exp_long], max_extra_messages=0)
    assert pairs == [
        Pair("5", [h("Ix"), g("OKx"), h("Tx")], [g("b1"), h("p1"), g("b2"), h("p2"), g("b3")],
             [g("a1"), h("o1"), g("a2")]),
    ]
    assert stats == PairStats(win=1, written=1)


def test_expert_reward_defaults_to_one_but_explicit_reward_is_used():
    experts = [
        expert("d", h("T"), g("a1")),  # no reward: 1.0
        expert("w", h("T"), g("a1"), reward=0.8),  # WebShop-like
    ]
    items = [explored("d", h("Tx"), g("b1"), reward=0.9), explored("w", h("Tx"), g("b1"), reward=0.9)]
    pairs, stats = build_pairs(experts, items, max_extra_messages=10)
    assert pairs == [
        Pair("d", [h("I"), g("OK"), h("T")], [g("a1")], [g("b1")]),  # 0.9 < 1.0: lose
        Pair("w", [h("Ix"), g("OKx"), h("Tx")], [g("b1")], [g("a1")]),  # 0.9 > 0.8: win
    ]
    assert stats == PairStats(win=1, lose=1, written=2)


# ------------------------------------------------------------------------------- tie, skip, drop


def test_tie_none_and_unknown_ids():
    experts = [
        expert("t", h("T"), g("a1"), reward=0.8),
        expert("d", h("T"), g("a1")),
        expert("n", h("T"), g("a1")),
        expert("never", h("T"), g("a1")),
    ]
    items = [
        explored("t", h("Tx"), g("b1"), reward=0.8),  # equal: tie
        explored("d", h("Tx"), g("b1"), reward=1),  # equal to the default 1.0: tie
        explored("n", h("Tx"), g("b1"), reward=None),  # skipped, but "n" counts as explored
        explored("orphan", h("Tx"), g("b1"), reward=0.0),  # no expert
    ]
    pairs, stats = build_pairs(experts, items, max_extra_messages=10)
    assert pairs == []
    assert stats == PairStats(tie=2, skipped_none=1, no_expert=1, expert_without_explored=1)


def test_empty_chosen_or_observation_ending_chosen_is_dropped():
    experts = [
        expert("e", h("T")),  # e = [T]: chosen is empty
        expert("o", h("T"), g("a1"), h("o1")),  # the expert itself ends with an observation
    ]
    items = [explored("e", h("Tx"), g("b1"), reward=0.0), explored("o", h("Tx"), g("b1"), reward=0.0)]
    pairs, stats = build_pairs(experts, items, max_extra_messages=None)
    assert pairs == []
    assert stats == PairStats(lose=2, dropped_not_model_end=2)


def test_int_and_str_ids_match_and_pair_takes_the_explored_id():
    experts = [expert(3, h("T"), g("a1")), expert("4", h("T"), g("a1"))]
    items = [explored("3", h("Tx"), g("b1"), reward=0.0), explored(4, h("Tx"), g("b1"), reward=0.0)]
    pairs, stats = build_pairs(experts, items, max_extra_messages=10)
    assert pairs == [
        Pair("3", [h("I"), g("OK"), h("T")], [g("a1")], [g("b1")]),
        Pair(4, [h("I"), g("OK"), h("T")], [g("a1")], [g("b1")]),
    ]
    assert [type(p.id) for p in pairs] == [str, int]
    assert stats == PairStats(lose=2, written=2)


def test_several_samples_of_one_id_each_give_a_pair_in_file_order():
    items = [
        explored("1", h("Tx"), g("s1"), reward=0.0),
        explored("1", h("Tx"), g("s2"), reward=1.0),  # tie with the default 1.0
        explored("1", h("Tx"), g("s3"), h("q3"), g("s4"), reward=0.5),
    ]
    pairs, stats = build_pairs([expert("1", h("T"), g("a1"))], items, max_extra_messages=2)
    # second lose: x = [Tx, s3, q3, s4], cut to x[:2 + 2] = all of it
    assert pairs == [
        Pair("1", [h("I"), g("OK"), h("T")], [g("a1")], [g("s1")]),
        Pair("1", [h("I"), g("OK"), h("T")], [g("a1")], [g("s3"), h("q3"), g("s4")]),
    ]
    assert stats == PairStats(tie=1, lose=2, written=2)


def test_duplicate_expert_ids_keep_the_last_like_eto():
    experts = [expert("1", h("T"), g("first")), expert("1", h("T"), g("last"))]
    pairs, stats = build_pairs(experts, [explored("1", h("Tx"), g("b1"), reward=0.0)], 10)
    assert pairs == [Pair("1", [h("I"), g("OK"), h("T")], [g("last")], [g("b1")])]
    assert stats == PairStats(lose=1, written=1, expert_duplicates=1)


def test_inputs_are_not_modified():
    before = [dict(m) for m in LONG_EXPLORED_1.conversations]
    build_pairs([EXPERT_1], [LONG_EXPLORED_1], max_extra_messages=2)
    assert LONG_EXPLORED_1.conversations == before
    assert len(EXPERT_1.conversations) == 6


def test_negative_max_extra_is_rejected():
    with pytest.raises(ValueError, match="max_extra_messages must be >= 0"):
        build_pairs([EXPERT_1], [LONG_EXPLORED_1], max_extra_messages=-1)


def test_stats_summary():
    stats = PairStats(win=3, tie=1, lose=10, skipped_none=2, no_expert=0, dropped_not_model_end=1,
                      written=12)
    assert stats.summary() == ("win 3 / tie 1 / lose 10; 12 pairs written (1 dropped: not ending with a "
                               "model message; 2 skipped: reward None; 0 without expert)")
    stats.expert_without_explored = 4
    stats.expert_duplicates = 2
    assert stats.summary().endswith(
        "0 without expert); 4 expert ids not explored; 2 duplicate expert ids (last one kept)")


def test_stats_of_a_mixed_build_and_its_summary():
    experts = [expert("a", h("T"), g("a1")), expert("b", h("T"), g("a1"), reward=0.5),
               expert("c", h("T"), g("a1")), expert("z", h("T"), g("a1"))]
    items = [
        explored("a", h("Tx"), g("b1"), reward=0.0),  # lose
        explored("b", h("Tx"), g("b1"), h("p1"), reward=1.0),  # win (trailing p1 dropped)
        explored("c", h("Tx"), g("b1"), reward=1.0),  # tie
        explored("c", h("Tx"), reward=0.0),  # lose, x = [] after dropping Tx: rejected empty, dropped
        explored("q", h("Tx"), g("b1"), reward=0.0),  # no expert
        explored("a", h("Tx"), g("b1"), reward=None),  # skipped
    ]
    pairs, stats = build_pairs(experts, items, max_extra_messages=10)
    assert [p.id for p in pairs] == ["a", "b"]
    assert stats == PairStats(win=1, tie=1, lose=2, skipped_none=1, no_expert=1, dropped_not_model_end=1,
                              written=2, expert_without_explored=1)
    assert stats.summary() == ("win 1 / tie 1 / lose 2; 2 pairs written (1 dropped: not ending with a "
                               "model message; 1 skipped: reward None; 1 without expert); "
                               "1 expert ids not explored")


# --------------------------------------------------------------------------------- max extra (CLI)


def test_default_max_extra_messages_per_environment():
    assert DEFAULT_MAX_EXTRA_MESSAGES == {"sciworld": 10, "webshop": 10, "alfworld": None}


@pytest.mark.parametrize("text, value", [("none", None), ("None", None), ("0", 0), ("10", 10), (" 7 ", 7)])
def test_parse_max_extra(text, value):
    assert parse_max_extra(text) == value


@pytest.mark.parametrize("text", ["-1", "1.5", "ten", "", "²"])
def test_parse_max_extra_rejects(text):
    with pytest.raises(ValueError, match="--max-extra-messages: .*non-negative integer.*'none'"):
        parse_max_extra(text)


# -------------------------------------------------------------------------------------- self-play


def test_self_play_best_against_worst():
    items = [
        explored("1", h("T"), g("A"), reward=0.5),
        explored("1", h("T"), g("B1"), h("pB"), g("B2"), h("pB2"), reward=1.0),  # best (first 1.0)
        explored("1", h("T"), g("C"), h("pC"), reward=0.0),  # worst (first 0.0)
        explored("1", h("T"), g("D"), reward=1.0),
        explored("1", h("T"), g("E"), reward=0.0),
        explored("2", h("T"), g("F"), reward=0.3),
        explored("2", h("T"), g("G"), reward=0.3),  # all equal: tie
        explored("3", h("T"), g("H"), reward=1.0),  # a single sample: tie
        explored("4", h("T"), g("J"), reward=None),  # skipped
        explored(5, h("T"), g("K"), reward=1.0),
        explored(5, h("T"), reward=0.0),  # worst has nothing after the task: rejected empty, dropped
    ]
    pairs, stats = build_self_play_pairs(items)
    assert pairs == [
        Pair("1", [h("Ix"), g("OKx"), h("T")], [g("B1"), h("pB"), g("B2")], [g("C")]),
    ]
    assert stats == PairStats(win=2, tie=2, skipped_none=1, dropped_not_model_end=1, written=1)


def test_self_play_with_nothing_to_pair():
    pairs, stats = build_self_play_pairs([explored("1", h("T"), g("A"), reward=0.0)])
    assert pairs == []
    assert stats == PairStats(tie=1)


# --------------------------------------------------------------------------------------------- RFT


def test_rft_set_is_experts_then_successful_explored():
    experts = [expert("1", h("T"), g("a1")), expert("2", h("T"), g("a2"), reward=0.8)]
    ok = explored("1", h("Tx"), g("b1"), h("p1"), reward=1.0)
    ok.extra = {"game_file": "g/1"}
    items = [
        ok,
        explored("2", h("Tx"), g("c1"), reward=0.5),
        explored("3", h("Tx"), g("d1"), reward=None),
        explored("4", h("Tx"), g("e1"), reward=1),
    ]
    assert build_rft_set(experts, items) == [
        Trajectory("1", [h("I"), g("OK"), h("T"), g("a1")], None),
        Trajectory("2", [h("I"), g("OK"), h("T"), g("a2")], 0.8),
        Trajectory("1", [h("Ix"), g("OKx"), h("Tx"), g("b1")], 1.0, {"game_file": "g/1"}),
        Trajectory("4", [h("Ix"), g("OKx"), h("Tx"), g("e1")], 1),
    ]
    assert [t.id for t in build_rft_set(experts, items, success_threshold=0.5)] == ["1", "2", "1", "2", "4"]
    assert ok.conversations[-1] == h("p1")  # the input keeps its observation
