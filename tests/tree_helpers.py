"""Test-local PackedBatch builder (independent of fasteto.packing.tree) and the FlashAttention
tolerance rule, shared by the tree attention tests (tests/ is on pytest's pythonpath)."""

from __future__ import annotations

import torch

from fasteto.ops.tree_attention import TreeAttentionMeta, tree_attention_meta
from fasteto.packing.layout import PackedBatch

Segments = list[tuple[int, list[int]]]  # (parent index or -1, token ids); parent index < own index


def build_batch(segments: Segments) -> PackedBatch:
    """A PackedBatch from explicit segments (in the given order). Sequences are the root-to-leaf paths;
    log-prob fields are empty (attention does not read them)."""
    lengths = [len(tokens) for _, tokens in segments]
    starts = [sum(lengths[:s]) for s in range(len(segments))]
    first_position: list[int] = []
    chains: list[list[int]] = []  # each segment's ancestors root first, then itself
    for s, (p, _) in enumerate(segments):
        assert -1 <= p < s
        first_position.append(0 if p < 0 else first_position[p] + lengths[p])
        chains.append(([] if p < 0 else chains[p]) + [s])
    kv_lists = [[t for a in chain for t in range(starts[a], starts[a] + lengths[a])] for chain in chains]
    leaves = [s for s in range(len(segments)) if all(p != s for p, _ in segments)]
    empty = torch.zeros(0, dtype=torch.long)
    return PackedBatch(
        input_ids=torch.tensor([t for _, tokens in segments for t in tokens]),
        position_ids=torch.tensor([first_position[s] + i for s, n in enumerate(lengths) for i in range(n)]),
        segment_ids=torch.tensor([s for s, n in enumerate(lengths) for _ in range(n)], dtype=torch.int32),
        cu_seqlens=torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32),
        parent=torch.tensor([p for p, _ in segments]),
        max_seqlen=max(lengths),
        kv_index=torch.tensor([t for kv in kv_lists for t in kv]),
        cu_seqlens_k=torch.tensor([0, *torch.tensor([len(kv) for kv in kv_lists]).cumsum(0).tolist()],
                                  dtype=torch.int32),
        max_seqlen_k=max(len(kv) for kv in kv_lists),
        logp_rows=empty, logp_targets=empty, contrib_entry=empty, contrib_seq=empty,
        num_sequences=len(leaves), seq_keys=leaves)


def meta_of(batch: PackedBatch) -> TreeAttentionMeta:
    """The op's layout from a batch's raw tree tensors (what ``fasteto.models.packed.layout_meta`` does)."""
    return tree_attention_meta(batch.cu_seqlens, batch.parent, batch.kv_index, batch.cu_seqlens_k)


def leaf_paths(batch: PackedBatch) -> list[torch.Tensor]:
    """Layout token indices of each sequence (root-to-leaf path), ``[L_q]`` long each, in seq_keys order."""
    parents, bounds = batch.parent.tolist(), batch.cu_seqlens.tolist()
    paths = []
    for leaf in batch.seq_keys:
        chain, s = [], leaf
        while s >= 0:
            chain.insert(0, s)
            s = parents[s]
        paths.append(torch.cat([torch.arange(bounds[a], bounds[a + 1]) for a in chain]))
    return paths


def random_segments(seed: int, vocab: int = 64, max_len: int = 7) -> Segments:
    """A random forest in depth-first order that always has 3 roots, a root-to-leaf depth >= 3, a node with
    3 children and a segment of length 1 (the skeleton), plus random extra branches."""
    gen = torch.Generator().manual_seed(seed)

    def draw(lo: int, hi: int) -> int:
        return int(torch.randint(lo, hi + 1, (1,), generator=gen))

    def tokens(n: int | None = None) -> list[int]:
        return torch.randint(0, vocab, (n or draw(1, max_len),), generator=gen).tolist()

    segments: Segments = []

    def grow(parent: int, depth: int, forced_children: int = 0, one_token: bool = False) -> int:
        segments.append((parent, tokens(1 if one_token else None)))
        me = len(segments) - 1
        extra = draw(0, 2) if depth < 3 else 0
        for _ in range(forced_children or extra):
            grow(me, depth + 1)
        return me

    root = grow(-1, 0)
    hub = grow(root, 1, forced_children=2)   # + chain below: exactly 3 children
    chain = grow(hub, 2)
    grow(chain, 3, one_token=True)           # depth 3, length 1
    grow(-1, 0)
    grow(-1, 0)
    return segments


def assert_by_rule(kernel: torch.Tensor, plain: torch.Tensor, oracle: torch.Tensor, factor: float = 2.0,
                   what: str = "output", terms: tuple[torch.Tensor, int] | None = None) -> None:
    """FlashAttention's rule: ``|kernel - oracle| <= factor * |plain - oracle| + floor`` (max norms), where
    ``plain`` is plain PyTorch in the kernel's dtype, ``oracle`` a higher-precision reference and
    ``floor`` twice the dtype's rounding error at the oracle's magnitude.

    ``terms=(magnitude, n)`` is for a result that is a sum of ``n`` terms, such as a weight gradient (a sum
    over tokens of outer products): ``magnitude`` is the oracle's sum of the terms' absolute values. Such a
    sum's rounding error scales with that magnitude, not with the result after cancellation. So the floor is
    then at least the random-walk estimate of an ``n``-term sum's error, ``sqrt(n) * u * max(magnitude)``.
    Without it, a plain error that happens to be small can set a bound that the kernel's equally valid
    summation order misses.
    """
    assert torch.isfinite(kernel).all(), f"{what}: kernel produced non-finite values"
    oracle = oracle.double()
    floor = 2 * ((oracle.to(kernel.dtype) + 0.3 - 0.3).double() - oracle).abs().max().item()
    floor = max(floor, torch.finfo(kernel.dtype).eps)
    if terms is not None:
        magnitude, n = terms
        unit_roundoff = torch.finfo(kernel.dtype).eps / 2
        floor = max(floor, n ** 0.5 * unit_roundoff * magnitude.abs().max().item())
    err_kernel = (kernel.double() - oracle).abs().max().item()
    err_plain = (plain.double() - oracle).abs().max().item()
    assert err_kernel <= factor * err_plain + floor, (
        f"{what}: kernel error {err_kernel:.3g} > {factor} x plain PyTorch error {err_plain:.3g} "
        f"+ floor {floor:.3g}")
