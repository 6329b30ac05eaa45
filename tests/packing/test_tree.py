"""Token-tree packing: hand-worked layouts (exact tensors), edge cases, and a seeded property test that
the packed tree computes exactly what the plain padded layout computes."""

from __future__ import annotations

import random

import pytest
import torch

from fasteto.data.tokenized import TokenizedPair, TokenizedSequence
from fasteto.packing import PackedBatch, pack_pairs, pack_sequences, pack_tree
from fasteto.trainer.batching import pad_pairs

F, T = False, True


def L(*values: int) -> torch.Tensor:  # noqa: N802 - a long tensor literal, kept short for the tables
    return torch.tensor(values, dtype=torch.long)


def I32(*values: int) -> torch.Tensor:  # noqa: N802
    return torch.tensor(values, dtype=torch.int32)


def assert_layout(b: PackedBatch, **expected) -> None:
    """Every given field equal (``torch.equal``: dtype, shape and values), then the invariants."""
    for name, want in expected.items():
        got = getattr(b, name)
        if isinstance(want, torch.Tensor):
            assert got.dtype == want.dtype and torch.equal(got, want), f"{name}: got {got}, expected {want}"
        else:
            assert got == want, f"{name}: got {got!r}, expected {want!r}"
    b.validate()


# ------------------------------------------------------------------------------ hand-worked layouts


def test_two_pairs_sharing_an_instruction_exact() -> None:
    # Instruction [1, 2]; pair a's task [3], pair b's task [7]. Pair a's chosen and rejected share their
    # first reply token 4; pair b's rejected ends with an observation token (mask False).
    pairs = [TokenizedPair("a", [1, 2, 3], [4, 5], [T, T], [4, 6], [T, T]),
             TokenizedPair("b", [1, 2, 7], [8], [T], [9, 9], [T, F])]
    b, chosen, rejected = pack_pairs(pairs)
    # Tree (segments in depth-first order):  s0 [1 2] ─┬─ s1 [3 4] ─┬─ s2 [5]   a/chosen
    #                                                  │            └─ s3 [6]   a/rejected
    #                                                  └─ s4 [7] ───┬─ s5 [8]   b/chosen
    #                                                               └─ s6 [9 9] b/rejected
    assert_layout(
        b,
        input_ids=L(1, 2, 3, 4, 5, 6, 7, 8, 9, 9),
        position_ids=L(0, 1, 2, 3, 4, 4, 2, 3, 3, 4),
        segment_ids=I32(0, 0, 1, 1, 2, 3, 4, 5, 6, 6),
        cu_seqlens=I32(0, 2, 4, 5, 6, 7, 8, 10),
        parent=L(-1, 0, 1, 1, 0, 4, 4),
        max_seqlen=2,
        kv_index=L(0, 1, 0, 1, 2, 3, 0, 1, 2, 3, 4, 0, 1, 2, 3, 5, 0, 1, 6, 0, 1, 6, 7, 0, 1, 6, 8, 9),
        cu_seqlens_k=I32(0, 2, 6, 11, 16, 19, 23, 28),
        max_seqlen_k=5,
        # entries: 4 after 3 (shared by a's two sequences), 5 after 4, 6 after 4 (row 3: the parent's last
        # token right after a split), 8 after 7, 9 after 7; the final 9 of b/rejected is an observation.
        logp_rows=L(2, 3, 3, 6, 6),
        logp_targets=L(4, 5, 6, 8, 9),
        contrib_entry=L(0, 1, 0, 2, 3, 4),
        contrib_seq=L(0, 0, 1, 1, 2, 3),
        num_sequences=4,
        seq_keys=[("a", "chosen"), ("a", "rejected"), ("b", "chosen"), ("b", "rejected")],
    )
    assert torch.equal(chosen, L(0, 2)) and torch.equal(rejected, L(1, 3))
    assert torch.equal(b.sequence_token_counts(), L(2, 2, 1, 1))
    mask = torch.tensor([
        [1, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0, 0, 0, 0, 0],
        [1, 1, 1, 1, 0, 0, 0, 0, 0, 0],
        [1, 1, 1, 1, 1, 0, 0, 0, 0, 0],
        [1, 1, 1, 1, 0, 1, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0, 1, 0, 0, 0],
        [1, 1, 0, 0, 0, 0, 1, 1, 0, 0],
        [1, 1, 0, 0, 0, 0, 1, 0, 1, 0],
        [1, 1, 0, 0, 0, 0, 1, 0, 1, 1],
    ], dtype=torch.bool)
    assert torch.equal(b.dense_attention_mask(), mask)


def test_rejected_strict_prefix_of_chosen() -> None:
    # rejected [3, 4] is chosen [3, 4, 5] cut short: it ends where chosen's own branch starts.
    b, chosen, rejected = pack_pairs([TokenizedPair("p", [1, 2], [3, 4, 5], [T, T, T], [3, 4], [T, T])])
    assert_layout(
        b, input_ids=L(1, 2, 3, 4, 5), position_ids=L(0, 1, 2, 3, 4), segment_ids=I32(0, 0, 0, 0, 1),
        cu_seqlens=I32(0, 4, 5), parent=L(-1, 0), max_seqlen=4,
        kv_index=L(0, 1, 2, 3, 0, 1, 2, 3, 4), cu_seqlens_k=I32(0, 4, 9), max_seqlen_k=5,
        logp_rows=L(1, 2, 3), logp_targets=L(3, 4, 5),
        contrib_entry=L(0, 1, 2, 0, 1), contrib_seq=L(0, 0, 0, 1, 1), num_sequences=2,
    )
    assert torch.equal(chosen, L(0)) and torch.equal(rejected, L(1))


def test_chosen_is_the_common_prefix() -> None:
    # chosen's continuation [3, 4] is exactly what it shares with rejected: chosen ends at the split.
    b, _, _ = pack_pairs([TokenizedPair("p", [1, 2], [3, 4], [T, T], [3, 4, 5, 6], [T, T, F, T])])
    assert_layout(
        b, input_ids=L(1, 2, 3, 4, 5, 6), position_ids=L(0, 1, 2, 3, 4, 5),
        segment_ids=I32(0, 0, 0, 0, 1, 1), cu_seqlens=I32(0, 4, 6), parent=L(-1, 0), max_seqlen=4,
        kv_index=L(0, 1, 2, 3, 0, 1, 2, 3, 4, 5), cu_seqlens_k=I32(0, 4, 10), max_seqlen_k=6,
        logp_rows=L(1, 2, 4), logp_targets=L(3, 4, 6),
        contrib_entry=L(0, 1, 0, 1, 2), contrib_seq=L(0, 0, 1, 1, 1), num_sequences=2,
    )


def test_identical_chosen_and_rejected_share_one_path() -> None:
    b, _, _ = pack_pairs([TokenizedPair("same", [1], [2, 3], [T, T], [2, 3], [T, T])])
    assert_layout(
        b, input_ids=L(1, 2, 3), position_ids=L(0, 1, 2), segment_ids=I32(0, 0, 0), cu_seqlens=I32(0, 3),
        parent=L(-1), max_seqlen=3, kv_index=L(0, 1, 2), cu_seqlens_k=I32(0, 3), max_seqlen_k=3,
        logp_rows=L(0, 1), logp_targets=L(2, 3),
        contrib_entry=L(0, 1, 0, 1), contrib_seq=L(0, 0, 1, 1), num_sequences=2,
    )
    assert torch.equal(b.sequence_sums(torch.tensor([0.5, 0.25])), torch.tensor([0.75, 0.75]))


def test_single_sequence_mask_at_position_zero_never_counts() -> None:
    b = pack_sequences([TokenizedSequence("s", [5, 6, 7], [T, T, F])])
    assert_layout(
        b, input_ids=L(5, 6, 7), position_ids=L(0, 1, 2), segment_ids=I32(0, 0, 0), cu_seqlens=I32(0, 3),
        parent=L(-1), max_seqlen=3, kv_index=L(0, 1, 2), cu_seqlens_k=I32(0, 3), max_seqlen_k=3,
        logp_rows=L(0), logp_targets=L(6), contrib_entry=L(0), contrib_seq=L(0), num_sequences=1,
        seq_keys=["s"],
    )


def test_no_common_prefix_gives_several_roots() -> None:
    b = pack_tree([("a", [4, 5], [F, T]), ("b", [2, 3], [F, T]), ("c", [4, 6, 7], [F, F, T])])
    # sorted: [2 3] (b), [4 5] (a), [4 6 7] (c): roots s0 [2 3] and s1 [4] with children s2 [5], s3 [6 7]
    assert_layout(
        b, input_ids=L(2, 3, 4, 5, 6, 7), position_ids=L(0, 1, 0, 1, 1, 2), segment_ids=I32(0, 0, 1, 2, 3, 3),
        cu_seqlens=I32(0, 2, 3, 4, 6), parent=L(-1, -1, 1, 1), max_seqlen=2,
        kv_index=L(0, 1, 2, 2, 3, 2, 4, 5), cu_seqlens_k=I32(0, 2, 3, 5, 8), max_seqlen_k=3,
        logp_rows=L(0, 2, 4), logp_targets=L(3, 5, 7),
        contrib_entry=L(1, 0, 2), contrib_seq=L(0, 1, 2), num_sequences=3, seq_keys=["a", "b", "c"],
    )


def test_sharing_across_pairs_or_only_within() -> None:
    # Both pairs have prompt [1, 2] and chosen [3]: identical chosen sequences in two different pairs.
    pairs = [TokenizedPair("x", [1, 2], [3], [T], [4], [T]), TokenizedPair("y", [1, 2], [3], [T], [5], [T])]
    within, _, _ = pack_pairs(pairs, share_across=False)
    assert_layout(
        within, input_ids=L(1, 2, 3, 4, 1, 2, 3, 5), position_ids=L(0, 1, 2, 2, 0, 1, 2, 2),
        segment_ids=I32(0, 0, 1, 2, 3, 3, 4, 5), cu_seqlens=I32(0, 2, 3, 4, 6, 7, 8),
        parent=L(-1, 0, 0, -1, 3, 3), kv_index=L(0, 1, 0, 1, 2, 0, 1, 3, 4, 5, 4, 5, 6, 4, 5, 7),
        cu_seqlens_k=I32(0, 2, 5, 8, 10, 13, 16),
        logp_rows=L(1, 1, 5, 5), logp_targets=L(3, 4, 3, 5),
        contrib_entry=L(0, 1, 2, 3), contrib_seq=L(0, 1, 2, 3),
    )
    across, _, _ = pack_pairs(pairs)
    assert_layout(
        across, input_ids=L(1, 2, 3, 4, 5), position_ids=L(0, 1, 2, 2, 2), segment_ids=I32(0, 0, 1, 2, 3),
        cu_seqlens=I32(0, 2, 3, 4, 5), parent=L(-1, 0, 0, 0),
        kv_index=L(0, 1, 0, 1, 2, 0, 1, 3, 0, 1, 4), cu_seqlens_k=I32(0, 2, 5, 8, 11),
        logp_rows=L(1, 1, 1), logp_targets=L(3, 4, 5),
        contrib_entry=L(0, 1, 0, 2), contrib_seq=L(0, 1, 2, 3),
    )


def test_groups_are_any_hashable() -> None:
    seqs = [("a", [1, 2], [F, T]), ("b", [1, 3], [F, T]), ("c", [1, 2], [F, T])]
    b = pack_tree(seqs, groups=["u", "v", "u"])
    assert_layout(b, input_ids=L(1, 2, 1, 3), parent=L(-1, -1), logp_rows=L(0, 2), logp_targets=L(2, 3),
                  contrib_entry=L(0, 1, 0), contrib_seq=L(0, 1, 2))


# ------------------------------------------------------------------------------ errors


def test_pair_without_model_token_names_the_pair() -> None:
    with pytest.raises(ValueError, match=r"pair 'bad': rejected has no model token"):
        pack_pairs([TokenizedPair("ok", [1], [2], [T], [3], [T]),
                    TokenizedPair("bad", [1], [2], [T], [3], [F])])
    # without a prompt, a mask True only at position 0 still leaves nothing to count
    with pytest.raises(ValueError, match=r"pair 7: chosen has no model token"):
        pack_pairs([TokenizedPair(7, [], [2, 3], [T, F], [3, 4], [F, T])])
    with pytest.raises(ValueError, match=r"sequence 'q' has no model token"):
        pack_sequences([TokenizedSequence("q", [1, 2], [T, F])])


@pytest.mark.parametrize(("sequences", "groups", "message"), [
    ([], None, "empty list of sequences"),
    ([("m", [1, 2], [T])], None, "sequence 'm': 2 token ids but 1 loss-mask"),
    ([("e", [], [])], None, "sequence 'e' has no tokens"),
    ([("n", [1, -2], [F, T])], None, r"sequence 'n': token ids must be a flat list of integers in \[0, 2"),
    ([("g", [1, 2], [F, T])], [0, 1], "groups has 2 entries for 1 sequences"),
])
def test_bad_input_is_named(sequences, groups, message) -> None:
    with pytest.raises(ValueError, match=message):
        pack_tree(sequences, groups=groups)


def test_validate_catches_a_broken_layout() -> None:
    b, _, _ = pack_pairs([TokenizedPair("a", [1, 2, 3], [4, 5], [T, T], [4, 6], [T, T])])
    broken = b.to("cpu")
    broken.kv_index = broken.kv_index.clone()
    broken.kv_index[5] = 0  # segment 1's keys are kv_index[4:9]
    with pytest.raises(ValueError, match="segment 1: kv_index must be its parent's keys"):
        broken.validate()
    broken = b.to("cpu")
    broken.parent = L(-1, 2, 1)
    with pytest.raises(ValueError, match="depth-first order"):
        broken.validate()


# ------------------------------------------------------------------------------ property test


def _turn(rng: random.Random, vocab: int) -> tuple[list[int], list[bool]]:
    """A model reply (mask True) and its observation (mask False), tokens from a tiny vocabulary so that
    unrelated sequences also collide by chance."""
    reply = [rng.randrange(vocab) for _ in range(rng.randint(1, 3))]
    obs = [rng.randrange(vocab) for _ in range(rng.randint(0, 3))]
    return reply + obs, [T] * len(reply) + [F] * len(obs)


def eto_pairs(seed: int, n_pairs: int, vocab: int = 6) -> list[TokenizedPair]:
    """ETO-shaped pairs: one of two instructions, one of a few tasks (some tasks explored twice), chosen
    and rejected sharing 0-2 first turns; some sides are prefixes of, or equal to, the other."""
    rng = random.Random(seed)
    instructions = [[rng.randrange(vocab) for _ in range(rng.randint(0, 4))] for _ in range(2)]
    tasks = [rng.choice(instructions) + [rng.randrange(vocab) for _ in range(rng.randint(0, 2))]
             for _ in range(4)]
    pairs = []
    for i in range(n_pairs):
        common = [_turn(rng, vocab) for _ in range(rng.randint(0, 2))]
        sides = []
        for _ in range(2):
            turns = common + [_turn(rng, vocab) for _ in range(rng.randint(0, 2))]
            ids = [t for ids, _ in turns for t in ids] or [rng.randrange(vocab)]
            mask = [m for _, mask in turns for m in mask] or [T]
            mask[0] = T  # a reply opens every continuation
            sides.append((ids, mask))
        kind = rng.random()
        if kind < 0.15:
            sides[1] = sides[0]
        elif kind < 0.3:
            cut = rng.randint(1, len(sides[0][0]))
            sides[1] = (sides[0][0][:cut], sides[0][1][:cut])
        prompt = rng.choice(tasks)
        if not prompt:  # position 0 never counts: make sure each side has a later model token
            sides = [(ids, mask) if any(mask[1:]) else (ids + [1], mask + [T]) for ids, mask in sides]
        pairs.append(TokenizedPair(i, prompt, sides[0][0], sides[0][1], sides[1][0], sides[1][1]))
    return pairs


def _causal_value(prefix: tuple[int, ...]) -> float:
    """A stand-in for a causal model's log-prob of ``prefix[-1]`` given ``prefix[:-1]``: any function of
    the prefix; small integers so float32 sums are exact in any order."""
    return float(hash(prefix) % 17)


@pytest.mark.parametrize(("seed", "share_across"), [(0, True), (1, True), (2, False), (3, True)])
def test_tree_computes_what_the_padded_layout_computes(seed: int, share_across: bool) -> None:
    pairs = eto_pairs(seed, n_pairs=24)
    b, chosen, rejected = pack_pairs(pairs, share_across=share_across)
    b.validate()
    padded = pad_pairs(pairs, pad_id=0)
    ids, loss_mask, lengths = padded["input_ids"], padded["loss_mask"], padded["attention_mask"].sum(1)
    rows = torch.cat([chosen, rejected])  # padded row r is packed sequence rows[r]

    # Tokens: one per distinct prefix (per pair when sharing only within pairs).
    owner = (lambda r: 0) if share_across else (lambda r: r % len(pairs))
    prefixes = {(owner(r), tuple(ids[r, :k].tolist()))
                for r in range(len(rows)) for k in range(1, int(lengths[r]) + 1)}
    assert b.num_tokens == len(prefixes)

    # Entries are unique (row, target) pairs, each used by some sequence.
    pairs_seen = set(zip(b.logp_rows.tolist(), b.logp_targets.tolist(), strict=True))
    assert len(pairs_seen) == b.logp_rows.numel()
    assert set(b.contrib_entry.tolist()) == set(range(b.logp_rows.numel()))

    # Per sequence: (row's position, target) entries == the padded layout's counted (t - 1, ids[t]).
    pos = b.position_ids
    for r, q in enumerate(rows.tolist()):
        entries = b.contrib_entry[b.contrib_seq == q]
        got = sorted(zip(pos[b.logp_rows[entries]].tolist(), b.logp_targets[entries].tolist(), strict=True))
        counted = [t for t in range(1, int(lengths[r])) if loss_mask[r, t]]
        assert got == [(t - 1, int(ids[r, t])) for t in counted]

    # Attention: the prefix a row sees (its attention row, in layout order) is its sequence's prefix, so
    # any causal function of the prefix summed per sequence equals the padded layout's sums.
    attend = b.dense_attention_mask()
    entries = zip(b.logp_rows.tolist(), b.logp_targets.tolist(), strict=True)
    values = torch.tensor([_causal_value(tuple(b.input_ids[attend[row]].tolist()) + (target,))
                           for row, target in entries])
    expected = torch.tensor([sum(_causal_value(tuple(ids[r, :t + 1].tolist()))
                                 for t in range(1, int(lengths[r])) if loss_mask[r, t])
                             for r in range(len(rows))])
    assert torch.equal(b.sequence_sums(values)[rows], expected)


@pytest.mark.parametrize("seed", [4, 5])
def test_each_sequence_walks_its_own_path_causally(seed: int) -> None:
    pairs = eto_pairs(seed, n_pairs=16)
    b, chosen, rejected = pack_pairs(pairs)
    attend = b.dense_attention_mask()
    children: dict[int, list[int]] = {}
    for s, p in enumerate(b.parent.tolist()):
        children.setdefault(p, []).append(s)
    cu = b.cu_seqlens.tolist()
    for q, pair in zip(chosen.tolist() + rejected.tolist(), pairs + pairs, strict=True):
        side = pair.chosen_ids if q % 2 == 0 else pair.rejected_ids
        seq = pair.prompt_ids + side
        # Walk down from the roots, at each step into the child whose first token is the next one.
        path, seg = [], -1
        while len(path) < len(seq):
            nxt = [s for s in children.get(seg, []) if b.input_ids[cu[s]] == seq[len(path)]]
            assert len(nxt) == 1, f"sequence {q}: no unique child continues with {seq[len(path)]}"
            seg = nxt[0]
            path += range(cu[seg], cu[seg + 1])
        assert len(path) == len(seq), f"sequence {q} does not end at a segment boundary"
        index = torch.tensor(path)
        assert torch.equal(b.input_ids[index], torch.tensor(seq))
        assert torch.equal(b.position_ids[index], torch.arange(len(seq)))
        assert torch.equal(attend[index][:, index], torch.ones(len(seq), len(seq), dtype=torch.bool).tril())
        assert torch.equal(b.kv_index[b.cu_seqlens_k[seg]:b.cu_seqlens_k[seg + 1]], index)
