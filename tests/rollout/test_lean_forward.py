"""The lean Llama forward of the continuous engine: the model's own logits and greedy replies, the
choice explicit, unsupported models refused with the reason."""

from __future__ import annotations

import pytest
import torch
from test_engine import conversations
from tiny import byte_tokenizer, tiny_llama
from transformers import Qwen2Config, Qwen2ForCausalLM

from fasteto.rollout import lean_forward, packed_linear
from fasteto.rollout.continuous import ContinuousEngine
from fasteto.rollout.engine import GenerationConfig, TransformersEngine
from fasteto.rollout.slot_kv import PackedStep, SlotStore, kv_shape, slot_attention
from fasteto.utils.choices import auto_choices, forget_choices

pytestmark = pytest.mark.usefixtures("one_thread")
NO_ONEDNN = packed_linear.unavailable(torch.bfloat16, torch.device("cpu"))
ONEDNN = pytest.param("onednn", marks=pytest.mark.skipif(NO_ONEDNN is not None, reason=str(NO_ONEDNN)))


def two_steps(model, forward):
    """Logits of a prefill step (two rows, one of them after a cached prefix) and then a mixed step (one
    decoding row, one joining row), through ``forward(ids, step)``."""
    layers, heads, dim = kv_shape(model)
    store = SlotStore(layers, 3, heads, dim, model.dtype, torch.device("cpu"), capacity=64)
    gen = torch.Generator().manual_seed(0)
    out = []
    for slots, starts, lengths in (([0, 2], [0, 0], [9, 5]), ([2, 0, 1], [5, 9, 0], [1, 6, 3])):
        step = PackedStep.build(store, slots, starts, lengths, attention="torch")
        ids = torch.randint(0, model.config.vocab_size, (sum(lengths),), generator=gen)
        out.append(forward(ids, step))
    return out


def hf_forward(model, packed=None):
    def forward(ids, step):
        with torch.no_grad(), slot_attention(model), (packed.routed() if packed else torch.no_grad()):
            return model(input_ids=ids[None], position_ids=step.position_ids, cache=step, use_cache=True,
                         slot_step=step, logits_to_keep=step.last).logits[0]
    return forward


@pytest.mark.parametrize("linear", ["torch", ONEDNN])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lean_logits_equal_the_models_own(linear, dtype):
    model = tiny_llama(300, hidden_size=48).to(dtype)
    packed = packed_linear.PackedLinears(model, 4) if linear == "onednn" else None
    expected = two_steps(model, hf_forward(model, packed))
    got = two_steps(model, lean_forward.LeanLlama(model, 4, onednn=linear == "onednn"))
    assert [g.shape for g in got] == [(2, 300), (3, 300)] and got[0].dtype == dtype
    # Bit-identical on the AMD EPYC; the tolerance leaves room for other CPUs' GEMM blocking, while a
    # formula off Hugging Face's (say, RMSNorm in bf16) moves float32 logits by far more than 1e-5.
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 1e-2, "atol": 1e-2}
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, **tol)


@pytest.mark.parametrize("linear", ["torch", ONEDNN])
def test_lean_greedy_replies_equal_the_plain_engine_over_turns(linear):
    tokenizer = byte_tokenizer()
    model = tiny_llama(len(tokenizer), hidden_size=48)
    cfg = GenerationConfig(max_new_tokens=10)
    engine = ContinuousEngine(model, tokenizer, 4, linear=linear, forward="lean")
    plain = TransformersEngine(model, tokenizer, batch_size=4)
    convs = conversations()
    for turn in range(2):
        assert engine.generate(convs, cfg) == plain.generate(convs, cfg)
        assert engine.last_token_ids == plain.last_token_ids and any(engine.last_token_ids)
        convs = [c + [{"from": "gpt", "value": "Thought: ok.\nAction: look"},
                      {"from": "human", "value": f"Observation: turn {turn}."}] for c in convs]
    assert engine.copied_tokens + engine.prefilled_tokens > 0 and engine.lean is not None


def test_update_weights_gathers_the_new_weights():
    tokenizer = byte_tokenizer()
    cfg = GenerationConfig(max_new_tokens=8)
    first, second = (tiny_llama(len(tokenizer), seed=s, hidden_size=48) for s in (0, 1))
    engine = ContinuousEngine(first, tokenizer, 2, forward="lean")
    engine.update_weights(second)
    convs = conversations()[:2]
    expected = ContinuousEngine(second, tokenizer, 2, forward="hf").generate(convs, cfg)
    assert engine.generate(convs, cfg) == expected


def test_resolve_is_explicit():
    llama = tiny_llama(64)
    if NO_ONEDNN is None:
        assert lean_forward.resolve("auto", llama, "onednn") == "lean"
        assert auto_choices()["explore.forward"]["chosen"] == "lean"
    assert lean_forward.resolve("auto", llama, "torch") == "hf"
    assert "token-identical" in auto_choices()["explore.forward"]["why"]
    assert lean_forward.resolve("lean", llama, "torch") == "lean"
    assert lean_forward.resolve("hf", llama, "onednn") == "hf"
    qwen = Qwen2ForCausalLM(Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64,
                                        num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2))
    forget_choices()
    assert lean_forward.resolve("auto", qwen, "onednn") == "hf"
    assert "qwen2" in auto_choices()["explore.forward"]["why"]
    with pytest.raises(RuntimeError, match="model_type 'qwen2'"):
        lean_forward.resolve("lean", qwen, "torch")
    with pytest.raises(ValueError, match="auto, hf, lean"):
        lean_forward.resolve("fast", llama, "torch")


def test_adapters_and_biases_are_refused_with_the_reason():
    from peft import LoraConfig, get_peft_model

    lora = get_peft_model(tiny_llama(64), LoraConfig(r=2, target_modules=["q_proj"])).base_model.model
    assert "merge adapters first" in lean_forward.unsupported(lora)
    biased = tiny_llama(64)
    biased.config.attention_bias = True
    assert "biases" in lean_forward.unsupported(biased)
    head = get_peft_model(tiny_llama(64), LoraConfig(r=2, target_modules=["lm_head"])).base_model.model
    assert lean_forward.unsupported(head).startswith("lm_head is a")
    assert lean_forward.unsupported(tiny_llama(64)) is None


def test_gathered_weights_are_the_models_concatenated():
    model = tiny_llama(64, hidden_size=48)  # 4 heads and 2 kv heads of 12; MLP 96
    lean = lean_forward.LeanLlama(model, 2, onednn=False)
    norm1, qkv, o, norm2, gate_up, down = lean.layers[1]
    attn, mlp = model.model.layers[1].self_attn, model.model.layers[1].mlp
    assert [w.shape for w in (qkv, o, gate_up, down)] == [(96, 48), (48, 48), (192, 48), (48, 96)]
    assert torch.equal(qkv, torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]))
    assert torch.equal(gate_up[96:], mlp.up_proj.weight) and torch.equal(lean.head, model.lm_head.weight)
    assert torch.equal(norm1, model.model.layers[1].input_layernorm.weight)
    assert torch.equal(norm2, model.model.layers[1].post_attention_layernorm.weight)
