"""Tree attention inside transformers models: the packed tree forward equals each sequence's own forward."""

from __future__ import annotations

import copy
import functools

import pytest
import torch
from tiny import tiny_llama
from transformers import MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM
from tree_helpers import assert_by_rule, build_batch, leaf_paths, meta_of, random_segments

from fasteto.models.packed import (
    attention_name,
    packed_hidden_states,
    tree_attention_enabled,
    tree_attention_forward,
)
from fasteto.ops.tree_attention import IMPLS
from fasteto.ops.tree_attention.reference import reference_tree_attention, tree_mask

# CPU runs FlexAttention eagerly on purpose (see fasteto/ops/tree_attention/flex.py)
pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")

VOCAB = 64
SMALL = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2)


def tiny_model(family: str):
    """2 layers, 4 heads over 2 KV heads (GQA), random init, fp32, eval mode."""
    torch.manual_seed(0)
    if family == "llama":
        return tiny_llama(vocab_size=VOCAB)
    if family == "qwen2":
        return Qwen2ForCausalLM(Qwen2Config(**SMALL)).eval()
    return MistralForCausalLM(MistralConfig(**SMALL)).eval()


def per_sequence_states(model, batch, paths) -> list[torch.Tensor]:
    """Each sequence's own final hidden states ``[L_q, D]``, with the model's usual (sdpa) attention."""
    decoder = model.get_decoder()
    return [decoder(input_ids=batch.input_ids[path][None]).last_hidden_state[0] for path in paths]


def check_packed_against_sequences(model, batch, impl):
    paths = leaf_paths(batch)
    # Tokens after a branch point sit at layout index != position: only position_ids can give RoPE right.
    assert not torch.equal(batch.position_ids, torch.arange(batch.num_tokens))
    with torch.no_grad():
        packed = packed_hidden_states(model, batch, impl=impl)
        plain = per_sequence_states(model, batch, paths)
        oracle = per_sequence_states(copy.deepcopy(model).double(), batch, paths)
    assert packed.shape == (batch.num_tokens, model.config.hidden_size)
    for path, seq_plain, seq_oracle in zip(paths, plain, oracle, strict=True):
        assert_by_rule(packed[path], seq_plain, seq_oracle, what=f"{impl} hidden states")


@pytest.mark.parametrize("impl", ["reference", "flex", "varlen_eager"])
@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral"])
def test_packed_tree_forward_equals_per_sequence_forward(family, impl):
    model = tiny_model(family)
    batch = build_batch(random_segments(0, vocab=VOCAB))
    check_packed_against_sequences(model, batch, impl)
    assert model.config._attn_implementation == "sdpa"  # restored after the call


def test_lora_wrapped_model_forward_and_gradients():
    peft = pytest.importorskip("peft")
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                             init_lora_weights=False)  # random B: the adapter changes the outputs
    model = peft.get_peft_model(tiny_llama(vocab_size=VOCAB), config)
    batch = build_batch(random_segments(1, vocab=VOCAB))
    paths = leaf_paths(batch)
    check_packed_against_sequences(model, batch, "reference")
    with torch.no_grad(), model.disable_adapter():
        base = packed_hidden_states(model, batch, impl="reference")
    assert (base - packed_hidden_states(model, batch, impl="reference")).abs().max() > 1e-3

    # d/dLoRA of sum over sequences of <w, h>: packed (shared tokens indexed once per sequence) vs one by one
    weight = torch.randn(model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    lora = {name: p for name, p in model.named_parameters() if p.requires_grad}
    assert lora and all("lora_" in name for name in lora)

    def lora_grads(run, m, terms=None):
        """Gradients of ``run(m)``; with ``terms`` (a dict), also each LoRA weight gradient's reduction:
        ``dW = sum over rows t of g_t x_t^T`` (every call's rows), stored as ``(sum |g_t| |x_t|^T, rows)``."""
        m.zero_grad()
        sums, rows, hooks = {}, {}, []

        def record(module, args, out, name):
            x = args[0].reshape(-1, args[0].shape[-1])
            rows[name] = rows.get(name, 0) + x.shape[0]
            out.register_hook(lambda g: sums.__setitem__(
                name, sums.get(name, 0) + g.reshape(-1, g.shape[-1]).abs().T @ x.abs()))

        if terms is not None:
            hooks = [module.register_forward_hook(functools.partial(record, name=name + ".weight"))
                     for name, module in m.named_modules()
                     if isinstance(module, torch.nn.Linear) and name + ".weight" in lora]
        try:
            loss = run(m)
            loss.backward()
        finally:
            for hook in hooks:
                hook.remove()
        if terms is not None:
            terms.update({name: (sums[name].detach(), rows[name]) for name in sums})
        return {name: p.grad.clone() for name, p in m.named_parameters() if p.requires_grad}

    def packed_loss(m):
        h = packed_hidden_states(m, batch, impl="reference")
        return sum((h[path] @ weight.to(h.dtype)).sum() for path in paths)

    def sequence_loss(m):
        return sum((h @ weight.to(h.dtype)).sum() for h in per_sequence_states(m, batch, paths))

    kernel = lora_grads(packed_loss, model)
    plain = lora_grads(sequence_loss, model)
    terms = {}
    oracle = lora_grads(sequence_loss, copy.deepcopy(model).double(), terms)
    assert terms.keys() == lora.keys()
    for name in lora:
        # The oracle's per-sequence reduction has at least the packed one's rows and sum |terms|.
        assert_by_rule(kernel[name], plain[name], oracle[name], factor=3.0, what=f"grad {name}",
                       terms=terms[name])


def test_context_switches_and_restores_even_on_error():
    model = tiny_model("llama")
    with tree_attention_enabled(model, "flex"):
        assert model.config._attn_implementation == attention_name("flex")
        assert model.model.config._attn_implementation == attention_name("flex")
    assert model.config._attn_implementation == "sdpa"
    model.set_attn_implementation("eager")
    with pytest.raises(RuntimeError, match="boom"), tree_attention_enabled(model, "reference"):
        raise RuntimeError("boom")
    assert model.config._attn_implementation == "eager"


def test_unknown_impl_raises_naming_the_options_and_leaves_the_model_alone():
    model = tiny_model("llama")
    batch = build_batch(random_segments(0, vocab=VOCAB))
    with pytest.raises(ValueError, match="impl='flash'.*" + ", ".join(IMPLS)):
        packed_hidden_states(model, batch, impl="flash")
    assert model.config._attn_implementation == "sdpa"


def test_forward_without_tree_meta_raises():
    model = tiny_model("qwen2")
    with tree_attention_enabled(model, "reference"), pytest.raises(ValueError, match="tree_meta"):
        model(input_ids=torch.tensor([[1, 2, 3]]))


def test_attention_dropout_in_training_raises_and_zero_dropout_trains():
    model = tiny_model("llama").train()
    batch = build_batch(random_segments(2, vocab=VOCAB))
    packed_hidden_states(model, batch, impl="reference").sum().backward()  # attention_dropout = 0
    model.config.attention_dropout = 0.1
    for layer in model.model.layers:
        layer.self_attn.attention_dropout = 0.1
    with pytest.raises(NotImplementedError, match="dropout"):
        packed_hidden_states(model, batch, impl="reference")


def test_activation_checkpointing_needs_the_context_around_backward():
    batch = build_batch(random_segments(2, vocab=VOCAB))
    plain = tiny_model("llama").train()
    packed_hidden_states(plain, batch, impl="reference").square().sum().backward()
    model = tiny_model("llama").train()
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    with pytest.raises(RuntimeError, match="tree_attention_enabled"):
        packed_hidden_states(model, batch, impl="reference")
    with tree_attention_enabled(model, "reference"):
        packed_hidden_states(model, batch, impl="reference").square().sum().backward()
    for (name, p), q in zip(model.named_parameters(), plain.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, msg=name)


def test_sliding_window_shorter_than_a_sequence_raises():
    torch.manual_seed(0)
    model = MistralForCausalLM(MistralConfig(**SMALL, sliding_window=4)).eval()
    batch = build_batch(random_segments(0, vocab=VOCAB))
    with pytest.raises(NotImplementedError, match="sliding_window=4"):
        packed_hidden_states(model, batch, impl="reference")


def test_attention_function_honours_scaling_and_gqa():
    batch = build_batch(random_segments(0, vocab=VOCAB))
    meta = meta_of(batch)
    gen = torch.Generator().manual_seed(0)
    n = batch.num_tokens
    query, key, value = (torch.randn(1, h, n, 8, generator=gen) for h in (6, 2, 2))
    out, weights = tree_attention_forward(torch.nn.Module(), query, key, value, None, dropout=0.0,
                                          scaling=0.21, impl="varlen_eager", tree_meta=meta)
    # GQA written out: query head h reads KV head h // 3
    k_rep, v_rep = (x[0].repeat_interleave(3, 0).transpose(0, 1) for x in (key, value))
    expected = reference_tree_attention(query[0].transpose(0, 1), k_rep, v_rep,
                                        tree_mask(meta.segment_ids, meta.parent), scale=0.21)
    assert weights is None and out.shape == (1, n, 6, 8)
    torch.testing.assert_close(out[0], expected)


@pytest.mark.gpu
@pytest.mark.parametrize("impl", ["varlen", "flex"])
def test_packed_tree_forward_on_cuda_bf16(impl):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device (torch.cuda.is_available() is False)")
    from fasteto.ops.tree_attention.varlen import varlen_unavailable_reason

    model = tiny_llama(vocab_size=VOCAB, hidden_size=64).to("cuda")  # head_dim 16: compiled flex's minimum
    model_bf16 = copy.deepcopy(model).to(torch.bfloat16)
    batch = build_batch(random_segments(0, vocab=VOCAB)).to("cuda")
    probe = torch.zeros(1, 1, 16, device="cuda", dtype=torch.bfloat16)
    if impl == "varlen" and (reason := varlen_unavailable_reason(probe, probe)) is not None:
        pytest.skip(f"varlen kernel unavailable: {reason}")
    paths = leaf_paths(batch)
    with torch.no_grad():
        packed = packed_hidden_states(model_bf16, batch, impl=impl)
        plain = per_sequence_states(model_bf16, batch, paths)
        oracle = per_sequence_states(model, batch, paths)
    for path, seq_plain, seq_oracle in zip(paths, plain, oracle, strict=True):
        assert_by_rule(packed[path], seq_plain, seq_oracle, what=f"{impl} bf16 hidden states")
