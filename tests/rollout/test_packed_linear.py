"""Packed oneDNN linears for the continuous engine: bf16 bit-identical to F.linear, the modules restored,
the choice explicit."""

from __future__ import annotations

import pytest
import torch
from test_engine import conversations
from tiny import byte_tokenizer, tiny_llama
from torch import nn

from fasteto.rollout import packed_linear
from fasteto.rollout.continuous import ContinuousEngine
from fasteto.rollout.engine import GenerationConfig
from fasteto.utils.choices import auto_choices

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.skipif(packed_linear.unavailable(torch.bfloat16, torch.device("cpu")) is not None,
                                 reason=str(packed_linear.unavailable(torch.bfloat16, torch.device("cpu"))))]

CPU = torch.device("cpu")


@pytest.mark.parametrize("rows", [1, 8, 37])
@pytest.mark.parametrize("bias", [False, True])
def test_bf16_packed_linear_is_bit_identical_to_f_linear(rows, bias):
    torch.manual_seed(0)
    layer = nn.Linear(96, 160, bias=bias).to(torch.bfloat16)
    packed = packed_linear.PackedLinears(layer, rows=8)
    x = torch.randn(2, rows, 96, dtype=torch.bfloat16)
    expected = layer(x)
    with packed.routed():
        got = layer(x)
    assert got.shape == (2, rows, 160) and got.dtype == torch.bfloat16
    assert torch.equal(got, expected)


def test_float32_packed_linear_is_close_to_f_linear():
    torch.manual_seed(0)
    layer = nn.Linear(96, 160)
    x = torch.randn(5, 96)
    with packed_linear.PackedLinears(layer, rows=8).routed():
        got = layer(x)
    torch.testing.assert_close(got, nn.functional.linear(x, layer.weight, layer.bias), rtol=1e-5, atol=1e-5)


def test_routed_restores_the_modules_also_on_error():
    model = tiny_llama(64).to(torch.bfloat16)
    packed = packed_linear.PackedLinears(model, rows=4)
    assert len(packed.weights) == 2 * 7 + 1  # q, k, v, o, gate, up, down per layer, and the head
    with pytest.raises(KeyError), packed.routed():
        assert all("forward" in module.__dict__ for module in packed.weights)
        raise KeyError("boom")
    assert not any("forward" in module.__dict__ for module in model.modules())


def test_packing_skips_subclasses_of_linear():
    class Wrapped(nn.Linear):
        pass

    model = nn.Sequential(nn.Linear(4, 4), Wrapped(4, 4)).to(torch.bfloat16)
    assert list(packed_linear.PackedLinears(model, rows=1).weights) == [model[0]]


def test_resolve_is_explicit():
    assert packed_linear.resolve("auto", torch.bfloat16, CPU) == "onednn"
    assert auto_choices()["explore.linear (cpu)"]["chosen"] == "onednn"
    assert packed_linear.resolve("auto", torch.float32, CPU) == "torch"
    assert "token-identical" in auto_choices()["explore.linear (cpu)"]["why"]
    assert packed_linear.resolve("onednn", torch.float32, CPU) == "onednn"
    assert packed_linear.resolve("torch", torch.bfloat16, CPU) == "torch"
    with pytest.raises(RuntimeError, match="CPU only"):
        packed_linear.resolve("onednn", torch.bfloat16, torch.device("meta"))
    with pytest.raises(RuntimeError, match="float16"):
        packed_linear.resolve("onednn", torch.float16, CPU)
    with pytest.raises(ValueError, match="auto, onednn, torch"):
        packed_linear.resolve("mkl", torch.bfloat16, CPU)


def test_continuous_engine_replies_are_token_identical_with_packed_bf16_linears():
    tokenizer = byte_tokenizer()
    model = tiny_llama(len(tokenizer), hidden_size=48).to(torch.bfloat16)
    cfg = GenerationConfig(max_new_tokens=12)
    packed = ContinuousEngine(model, tokenizer, 4, linear="auto", forward="hf")
    plain = ContinuousEngine(model, tokenizer, 4, linear="torch")
    assert (packed.linear, plain.linear) == ("onednn", "torch")
    convs = conversations()
    assert packed.generate(convs, cfg) == plain.generate(convs, cfg)
    assert packed.last_token_ids == plain.last_token_ids and any(packed.last_token_ids)
    assert not any("forward" in module.__dict__ for module in model.modules())


def test_update_weights_packs_the_new_weights():
    tokenizer = byte_tokenizer()
    cfg = GenerationConfig(max_new_tokens=8)
    first, second = (tiny_llama(len(tokenizer), seed=s, hidden_size=48).to(torch.bfloat16) for s in (0, 1))
    engine = ContinuousEngine(first, tokenizer, 2, linear="onednn", forward="hf")
    engine.update_weights(second)
    convs = conversations()[:2]
    expected = ContinuousEngine(second, tokenizer, 2, linear="torch").generate(convs, cfg)
    assert engine.generate(convs, cfg) == expected
