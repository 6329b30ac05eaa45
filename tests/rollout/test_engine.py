"""TransformersEngine on a tiny random Llama and a byte-level ChatML tokenizer built here (no download)."""

from __future__ import annotations

import pytest
import torch
from tiny import byte_tokenizer, tiny_llama
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

from fasteto.data.chat import to_chat
from fasteto.data.types import GPT, HUMAN, example_message, message
from fasteto.rollout.engine import GenerationConfig, TransformersEngine, stop_token_ids

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny ops: one thread is much faster


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    return byte_tokenizer()


@pytest.fixture(scope="module")
def model(tokenizer) -> LlamaForCausalLM:
    return tiny_llama(len(tokenizer), hidden_size=48)


def conversations() -> list[list[dict]]:
    """Four conversations of quite different lengths, so a batch of them needs real left padding."""
    short = [message(HUMAN, "Hi.")]
    medium = [message(HUMAN, "You are an agent."), message(GPT, "OK"), message(HUMAN, "Boil water.")]
    long = medium + [message(GPT, "Thought: go.\nAction: look around"),
                     message(HUMAN, "Observation: This room is called the kitchen. " * 4)]
    return [medium, short, long, [message(HUMAN, "Ünïcode tëxt, 3 × 4 = 12.")]]


def with_example_and_turns() -> list[dict]:
    """An engine context as the explorer builds it: instruction exchange, a two-message in-context
    example, the task, then two exchanges; every message is distinct so a cut shows which went."""
    return [message(HUMAN, "You are an agent."), message(GPT, "OK"),
            example_message(HUMAN, "Example task: open the door."), example_message(GPT, "Action: open door"),
            message(HUMAN, "Boil water."),
            message(GPT, "Thought: go.\nAction: look around"), message(HUMAN, "Observation: a kitchen. " * 3),
            message(GPT, "Thought: take it.\nAction: pick up pot"), message(HUMAN, "Observation: taken.")]


def test_chat_roles_and_template(tokenizer):
    chat = to_chat([message(HUMAN, "a"), message(GPT, "b"), message(HUMAN, "c")])
    assert [m["role"] for m in chat] == ["user", "assistant", "user"]
    text = tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert text.endswith("<|im_start|>user\nc<|im_end|>\n<|im_start|>assistant\n")
    assert stop_token_ids(tokenizer) == [tokenizer.convert_tokens_to_ids("<|im_end|>")]


def test_batched_greedy_equals_one_at_a_time(model, tokenizer):
    cfg = GenerationConfig(max_new_tokens=12)
    convs = conversations()
    batched = TransformersEngine(model, tokenizer, batch_size=3).generate(convs, cfg)
    alone = TransformersEngine(model, tokenizer, batch_size=1)
    assert batched == [alone.generate([c], cfg)[0] for c in convs]
    assert any(batched)  # a random model writes some text, not only an immediate end of turn


def test_stops_at_end_of_turn(tokenizer):
    """Bias the head so that ``<|im_end|>`` wins once a 'Z' has been written: every reply is cut at the
    first end of turn, and the token itself is not in the text."""
    model = tiny_llama(len(tokenizer), hidden_size=48, seed=1)
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    z = tokenizer.convert_tokens_to_ids("Z")
    with torch.no_grad():
        # Dimension 0 of the residual stream says "the current token is Z": +1 for 'Z', -1 for the rest;
        # the head reads only that dimension: 'Z' wins after any other token, the end of turn after 'Z'.
        model.model.embed_tokens.weight[:, 0] = -1.0
        model.model.embed_tokens.weight[z] = 0.0
        model.model.embed_tokens.weight[z, 0] = 1.0
        model.lm_head.weight.zero_()
        model.lm_head.weight[z, 0] = -1.0
        model.lm_head.weight[end, 0] = 1.0
    cfg = GenerationConfig(max_new_tokens=20)
    replies = TransformersEngine(model, tokenizer).generate(conversations(), cfg)
    assert all(r == "Z" for r in replies), replies


def test_no_end_of_turn_within_max_new_tokens(model, tokenizer):
    engine = TransformersEngine(model, tokenizer)
    replies = engine.generate(conversations(), GenerationConfig(max_new_tokens=5))
    # One token per byte: at most 5 characters (a cut multi-byte character decodes to one U+FFFD each).
    assert all(len(r) <= 5 for r in replies) and not any("<|im_" in r for r in replies)


def test_seeded_sampling_is_reproducible(model, tokenizer):
    engine = TransformersEngine(model, tokenizer, batch_size=2)
    cfg = GenerationConfig(max_new_tokens=10, greedy=False, temperature=1.0, seed=123)
    first = engine.generate(conversations(), cfg)
    torch.manual_seed(999)  # the global generator's state must not matter
    assert engine.generate(conversations(), cfg) == first
    other = engine.generate(conversations(), GenerationConfig(max_new_tokens=10, greedy=False,
                                                               temperature=1.0, seed=124))
    assert other != first


def test_unseeded_sampling_advances_the_global_generator(model, tokenizer):
    engine = TransformersEngine(model, tokenizer)
    cfg = GenerationConfig(max_new_tokens=10, greedy=False, temperature=1.0)
    torch.manual_seed(5)
    assert engine.generate(conversations(), cfg) != engine.generate(conversations(), cfg)


def test_max_context_drops_the_example_then_oldest_exchanges_never_the_task(model, tokenizer):
    conv = with_example_and_turns()
    instruction, ack, _, _, task, reply1, obs1, reply2, obs2 = conv
    engine = TransformersEngine(model, tokenizer)
    full = engine.encode(conv)
    no_example = engine.encode([instruction, ack, task, reply1, obs1, reply2, obs2])
    minimal = engine.encode([instruction, ack, task, reply2, obs2])
    engine.max_context = len(full) + 4
    assert engine.encode(conv, max_new_tokens=4) == full  # fits exactly
    assert engine.encode(conv, max_new_tokens=5) == no_example  # one token over: the whole example goes
    engine.max_context = len(no_example) + 4
    assert engine.encode(conv, max_new_tokens=5) == minimal  # then the oldest exchange, not the task
    engine.max_context = len(minimal) + 3
    with pytest.raises(ValueError, match="max_context"):  # the task and last observation never go
        engine.encode(conv, max_new_tokens=4)
    engine.max_context = None
    assert engine.encode(conv, max_new_tokens=10**6) == full


def test_update_weights_swaps_the_policy(model, tokenizer):
    cfg = GenerationConfig(max_new_tokens=8)
    engine = TransformersEngine(model, tokenizer)
    before = engine.generate(conversations(), cfg)
    engine.update_weights(tiny_llama(len(tokenizer), hidden_size=48, seed=7))
    assert engine.generate(conversations(), cfg) != before


def test_keeps_training_mode_and_rejects_a_trailing_reply(tokenizer):
    model = tiny_llama(len(tokenizer), hidden_size=48).train()
    engine = TransformersEngine(model, tokenizer)
    engine.generate(conversations()[:1], GenerationConfig(max_new_tokens=2))
    assert model.training
    with pytest.raises(ValueError, match="end with a human message"):
        engine.generate([[message(HUMAN, "a"), message(GPT, "b")]], GenerationConfig())
