"""Tree attention backends against the dense reference: masks exactly, numbers by FlashAttention's rule."""

from __future__ import annotations

import inspect
import logging
import operator

import pytest
import torch
from torch.nn.attention.flex_attention import create_mask
from tree_helpers import assert_by_rule, build_batch, meta_of, random_segments

from fasteto.ops.tree_attention import IMPLS, tree_attention, tree_attention_meta
from fasteto.ops.tree_attention import api as tree_api
from fasteto.ops.tree_attention import varlen as varlen_module
from fasteto.ops.tree_attention.flex import ancestor_table, build_block_mask
from fasteto.ops.tree_attention.reference import tree_mask
from fasteto.ops.tree_attention.varlen import varlen_unavailable_reason
from fasteto.utils.choices import auto_choices, forget_choices

# CPU runs FlexAttention eagerly on purpose (see fasteto/ops/tree_attention/flex.py)
pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")

SCALE = 0.37  # not D ** -0.5: the scale argument must be honoured
HEADS, KV_HEADS, HEAD_DIM = 4, 2, 16
SEEDS = [0, 1, 2]

# seg 0: root, tokens 0-1; seg 1: child of 0, tokens 2-3; seg 2: child of 0, token 4; seg 3: root, 5-6
SMALL_TREE = [(-1, [5, 6]), (0, [7, 8]), (0, [9]), (-1, [10, 11])]
SMALL_MASK = torch.tensor([
    [1, 0, 0, 0, 0, 0, 0],
    [1, 1, 0, 0, 0, 0, 0],
    [1, 1, 1, 0, 0, 0, 0],
    [1, 1, 1, 1, 0, 0, 0],
    [1, 1, 0, 0, 1, 0, 0],
    [0, 0, 0, 0, 0, 1, 0],
    [0, 0, 0, 0, 0, 1, 1],
], dtype=torch.bool)


def qkv(num_tokens: int, seed: int, dtype: torch.dtype = torch.float32, device: str = "cpu",
        requires_grad: bool = False) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(1000 + seed)
    shapes = [(num_tokens, heads, HEAD_DIM) for heads in (HEADS, KV_HEADS, KV_HEADS)]
    return tuple(torch.randn(s, generator=gen).to(device=device, dtype=dtype).requires_grad_(requires_grad)
                 for s in shapes)


def test_random_trees_have_the_required_shapes():
    for seed in SEEDS:
        segments = random_segments(seed)
        parents = [p for p, _ in segments]
        depth = []
        for p in parents:
            depth.append(0 if p < 0 else depth[p] + 1)
        assert parents.count(-1) == 3 and max(depth) >= 3
        assert any(parents.count(s) == 3 for s in range(len(parents)))
        assert any(len(tokens) == 1 for _, tokens in segments)


def test_builder_layout_of_small_tree():
    batch = build_batch(SMALL_TREE)
    assert torch.equal(batch.position_ids, torch.tensor([0, 1, 2, 3, 2, 0, 1]))
    assert torch.equal(batch.kv_index, torch.tensor([0, 1, 0, 1, 2, 3, 0, 1, 4, 5, 6]))
    assert torch.equal(batch.cu_seqlens_k, torch.tensor([0, 2, 6, 9, 11], dtype=torch.int32))
    assert (batch.max_seqlen, batch.max_seqlen_k) == (2, 4)


def test_reference_mask_of_small_tree():
    batch = build_batch(SMALL_TREE)
    assert torch.equal(tree_mask(batch.segment_ids, batch.parent), SMALL_MASK)


def test_flex_mask_mod_of_small_tree():
    batch = build_batch(SMALL_TREE)
    block_mask = build_block_mask(batch.segment_ids, batch.parent)
    dense = create_mask(block_mask.mask_mod, 1, 1, 7, 7, device="cpu")[0, 0]
    assert torch.equal(dense, SMALL_MASK)


def test_ancestor_table_of_a_chain_and_branches():
    # 0 <- 1 <- 2 <- 3 (a chain of depth 3), 0 <- 4, root 5 <- 6
    table = ancestor_table(torch.tensor([-1, 0, 1, 2, 0, -1, 5]))
    expected = torch.zeros(8, 8, dtype=torch.bool)
    for s, ancestors in {1: [0], 2: [0, 1], 3: [0, 1, 2], 4: [0], 6: [5]}.items():
        expected[s, ancestors] = True
    assert torch.equal(table, expected)


@pytest.mark.parametrize("seed", SEEDS)
def test_masks_agree_on_random_trees(seed):
    batch = build_batch(random_segments(seed))
    block_mask = build_block_mask(batch.segment_ids, batch.parent)
    n = batch.num_tokens
    dense = create_mask(block_mask.mask_mod, 1, 1, n, n, device="cpu")[0, 0]
    assert torch.equal(dense, tree_mask(batch.segment_ids, batch.parent))


@pytest.mark.parametrize("impl", ["flex", "varlen_eager"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("seed", SEEDS)
def test_forward_matches_reference(impl, dtype, seed):
    meta = meta_of(build_batch(random_segments(seed)))
    q, k, v = qkv(meta.num_tokens, seed, dtype)
    with torch.no_grad():
        out = tree_attention(q, k, v, meta, impl=impl, scale=SCALE)
        plain = tree_attention(q, k, v, meta, impl="reference", scale=SCALE)
        oracle = tree_attention(q.double(), k.double(), v.double(), meta, impl="reference", scale=SCALE)
    assert out.shape == q.shape and out.dtype == dtype
    assert_by_rule(out, plain, oracle)


@pytest.mark.parametrize("impl", ["flex", "varlen_eager"])
def test_forward_matches_reference_across_several_blocks(impl):
    # ~300 tokens: several 128-token flex blocks, the last one partial (padded with the sentinel segment)
    meta = meta_of(build_batch(random_segments(3, max_len=40)))
    assert meta.num_tokens > 256 and meta.num_tokens % 128
    q, k, v = qkv(meta.num_tokens, 3)
    with torch.no_grad():
        out = tree_attention(q, k, v, meta, impl=impl, scale=SCALE)
        plain = tree_attention(q, k, v, meta, impl="reference", scale=SCALE)
        oracle = tree_attention(q.double(), k.double(), v.double(), meta, impl="reference", scale=SCALE)
    assert_by_rule(out, plain, oracle)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("seed", SEEDS)
def test_gathered_kv_gradients_match_reference(dtype, seed):
    meta = meta_of(build_batch(random_segments(seed)))
    inputs = qkv(meta.num_tokens, seed, dtype, requires_grad=True)
    grad_out = torch.randn(meta.num_tokens, HEADS, HEAD_DIM, generator=torch.Generator().manual_seed(seed))
    grads = {}
    for name, impl, cast in [("kernel", "varlen_eager", dtype), ("plain", "reference", dtype),
                             ("oracle", "reference", torch.float64)]:
        leaves = [x.detach().to(cast).requires_grad_() for x in inputs]
        out = tree_attention(*leaves, meta, impl=impl, scale=SCALE)
        out.backward(grad_out.to(cast))
        grads[name] = [x.grad for x in leaves]
    for i, what in enumerate(["dq", "dk", "dv"]):
        assert_by_rule(grads["kernel"][i], grads["plain"][i], grads["oracle"][i], factor=3.0, what=what)


def test_varlen_call_matches_torch_varlen_attn_signature(monkeypatch):
    """The real kernel needs CUDA; here a stand-in with varlen_attn's exact signature checks what we pass
    (argument order, int32 offsets, causal as window_size=(-1, 0), GQA flag, scale) and computes varlen
    semantics with SDPA, so a wrong argument shows up as a wrong output."""
    varlen_attn = pytest.importorskip("torch.nn.attention.varlen").varlen_attn
    signature = inspect.signature(varlen_attn)

    def stand_in(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        a = bound.arguments
        assert a["window_size"] == (-1, 0) and a["enable_gqa"] and a["scale"] == SCALE
        assert a["cu_seq_q"].dtype == a["cu_seq_k"].dtype == torch.int32
        cu_q, cu_k = a["cu_seq_q"].tolist(), a["cu_seq_k"].tolist()
        assert a["max_q"] == max(map(operator.sub, cu_q[1:], cu_q[:-1]))
        assert a["max_k"] == max(map(operator.sub, cu_k[1:], cu_k[:-1]))
        outs = []
        for s in range(len(cu_q) - 1):
            q_s, k_s, v_s = (x[c[s]:c[s + 1]].transpose(0, 1)[None] for x, c in
                             ((a["query"], cu_q), (a["key"], cu_k), (a["value"], cu_k)))
            rows, cols = torch.arange(q_s.shape[2])[:, None], torch.arange(k_s.shape[2])[None, :]
            mask = cols <= rows + k_s.shape[2] - q_s.shape[2]
            outs.append(torch.nn.functional.scaled_dot_product_attention(
                q_s, k_s, v_s, attn_mask=mask, scale=a["scale"], enable_gqa=True)[0].transpose(0, 1))
        return torch.cat(outs)

    monkeypatch.setattr(varlen_module, "_kernel", lambda: ("torch.nn.attention.varlen.varlen_attn", stand_in))
    meta = meta_of(build_batch(random_segments(0)))
    q, k, v = qkv(meta.num_tokens, 0)
    out = varlen_module.varlen_tree_attention(q, k, v, meta.kv_index, meta.cu_seqlens, meta.cu_seqlens_k,
                                              meta.max_seqlen, meta.max_seqlen_k, SCALE)
    torch.testing.assert_close(out, tree_attention(q, k, v, meta, impl="reference", scale=SCALE))


def test_meta_from_raw_tensors_derives_segments_and_caches_masks():
    batch = build_batch(SMALL_TREE)
    meta = tree_attention_meta(batch.cu_seqlens.long(), batch.parent, batch.kv_index, batch.cu_seqlens_k)
    assert torch.equal(meta.segment_ids, torch.tensor([0, 0, 1, 1, 2, 3, 3], dtype=torch.int32))
    assert (meta.max_seqlen, meta.max_seqlen_k, meta.cu_seqlens.dtype) == (2, 4, torch.int32)
    q, k, v = qkv(batch.num_tokens, 0)
    first = tree_attention(q, k, v, meta, impl="reference")
    assert ("reference", "cpu") in meta.prepared  # built once, reused by the next layer
    assert torch.equal(first, tree_attention(q, k, v, meta, impl="reference"))
    with pytest.raises(TypeError, match="TreeAttentionMeta"):
        tree_attention(q, k, v, batch, impl="reference")


def test_unknown_impl_names_the_options():
    batch = meta_of(build_batch(SMALL_TREE))
    q, k, v = qkv(batch.num_tokens, 0)
    with pytest.raises(ValueError, match="impl='triton'.*" + ", ".join(IMPLS)):
        tree_attention(q, k, v, batch, impl="triton")


def test_explicit_flex_with_grad_on_cpu_raises_with_reason():
    batch = meta_of(build_batch(SMALL_TREE))
    q, k, v = qkv(batch.num_tokens, 0, requires_grad=True)
    with pytest.raises(ValueError, match="no backward on CPU"):
        tree_attention(q, k, v, batch, impl="flex")


def test_explicit_varlen_on_cpu_raises_with_reason():
    batch = meta_of(build_batch(SMALL_TREE))
    q, k, v = qkv(batch.num_tokens, 0)
    with pytest.raises(ValueError, match="impl='varlen' cannot run here: .*CUDA"):
        tree_attention(q, k, v, batch, impl="varlen")


def test_auto_on_cpu_uses_varlen_eager_and_logs_once(caplog):
    forget_choices()
    batch = meta_of(build_batch(SMALL_TREE))
    q, k, v = qkv(batch.num_tokens, 0)
    with caplog.at_level(logging.INFO, logger="fasteto.auto"):
        out = tree_attention(q, k, v, batch)
        tree_attention(q, k, v, batch)
    assert torch.equal(out, tree_attention(q, k, v, batch, impl="varlen_eager"))
    why = "no fused tree kernel with a backward on cpu"
    assert [r.getMessage() for r in caplog.records].count(
        f"tree_attention impl (cpu): auto chose 'varlen_eager' ({why})") == 1
    assert auto_choices()["tree_attention impl (cpu)"] == {"chosen": "varlen_eager", "why": why}


def test_bad_inputs_and_layouts_raise():
    batch = meta_of(build_batch(SMALL_TREE))
    q, k, v = qkv(batch.num_tokens, 0)
    with pytest.raises(ValueError, match="one row per layout token"):
        tree_attention(q[:-1], k[:-1], v[:-1], batch, impl="reference")
    with pytest.raises(ValueError, match="H % Hkv"):
        tree_attention(q[:, :3], k, v, batch, impl="reference")
    raw = build_batch(SMALL_TREE)
    with pytest.raises(ValueError, match="parent"):
        tree_attention_meta(raw.cu_seqlens, torch.tensor([-1, 2, 0, -1]), raw.kv_index, raw.cu_seqlens_k)
    with pytest.raises(ValueError, match="cu_seqlens_k"):
        tree_attention_meta(raw.cu_seqlens, raw.parent, raw.kv_index,
                            torch.tensor([0, 2, 5, 8, 10], dtype=torch.int32))
    with pytest.raises(ValueError, match="cu_seqlens must rise"):
        tree_attention_meta(torch.tensor([0, 2, 2, 5, 7]), raw.parent, raw.kv_index, raw.cu_seqlens_k)
    with pytest.raises(ValueError, match="kv_index must have"):
        tree_attention_meta(raw.cu_seqlens, raw.parent, raw.kv_index[:-1], raw.cu_seqlens_k)


@pytest.mark.slow
def test_compiled_flex_forward_on_cpu():
    """torch.compile(flex_attention) and compiled create_block_mask on CPU (inductor C++): ~30 s or more
    to compile on the 2-core CI box; the same code path CUDA takes."""
    from fasteto.ops.tree_attention.flex import flex_tree_attention

    meta = meta_of(build_batch(random_segments(0)))
    q, k, v = qkv(meta.num_tokens, 0)
    block_mask = build_block_mask(meta.segment_ids, meta.parent, compiled=True)
    n = meta.num_tokens
    assert torch.equal(create_mask(block_mask.mask_mod, 1, 1, n, n, device="cpu")[0, 0],
                       tree_mask(meta.segment_ids, meta.parent))
    with torch.no_grad():
        out = flex_tree_attention(q, k, v, block_mask, SCALE, compiled=True)
        plain = tree_attention(q, k, v, meta, impl="reference", scale=SCALE)
        oracle = tree_attention(q.double(), k.double(), v.double(), meta, impl="reference", scale=SCALE)
    assert_by_rule(out, plain, oracle)


def _require_cuda():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device (torch.cuda.is_available() is False)")


@pytest.mark.gpu
@pytest.mark.parametrize("impl", ["varlen", "flex"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("seed", SEEDS)
def test_cuda_kernels_match_reference_with_gradients(impl, dtype, seed):
    _require_cuda()
    meta = meta_of(build_batch(random_segments(seed)).to("cuda"))
    inputs = qkv(meta.num_tokens, seed, dtype, device="cuda")
    if impl == "varlen" and (reason := varlen_unavailable_reason(inputs[0], inputs[1])) is not None:
        pytest.skip(f"varlen kernel unavailable: {reason}")
    grad_out = torch.randn(meta.num_tokens, HEADS, HEAD_DIM, generator=torch.Generator().manual_seed(seed))
    results = {}
    for name, which, cast in [("kernel", impl, dtype), ("plain", "reference", dtype),
                              ("oracle", "reference", torch.float32)]:
        leaves = [x.detach().to(cast).requires_grad_() for x in inputs]
        out = tree_attention(*leaves, meta, impl=which, scale=SCALE)
        out.backward(grad_out.to(device="cuda", dtype=cast))
        results[name] = [out.detach(), *(x.grad for x in leaves)]
    for i, what in enumerate(["out", "dq", "dk", "dv"]):
        assert_by_rule(results["kernel"][i], results["plain"][i], results["oracle"][i],
                       factor=2.0 if what == "out" else 3.0, what=f"{impl} {what}")


@pytest.mark.gpu
def test_auto_on_cuda_prefers_varlen():
    _require_cuda()
    batch = build_batch(SMALL_TREE).to("cuda")
    q, k, v = qkv(batch.num_tokens, 0, torch.bfloat16, device="cuda")
    expected = "varlen" if varlen_unavailable_reason(q, k) is None else "flex"
    assert tree_api.resolve_impl("auto", q, k, v) == expected
