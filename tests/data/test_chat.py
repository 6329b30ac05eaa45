"""Training and inference format a conversation through one rendering (``fasteto.data.chat``): the ids
the engine feeds the model before a reply are exactly the ids training puts before that reply."""

from __future__ import annotations

import pytest
from tiny import byte_tokenizer

from fasteto.data.chat import prompt_ids, to_chat
from fasteto.data.tokenize import tokenize_conversation, tokenize_pair
from fasteto.data.types import GPT, HUMAN, Pair, Trajectory, message
from fasteto.rollout.engine import encode_prompt

CONVERSATION = [message(HUMAN, "instruction"), message(GPT, "OK"), message(HUMAN, "task: find x"),
                message(GPT, "Thought: look.\nAction: look"), message(HUMAN, "You see x."),
                message(GPT, "Action: take x")]


def test_engine_prompt_equals_training_prefix_before_every_reply():
    tok = byte_tokenizer()
    seq = tokenize_conversation(tok, Trajectory(id="t", conversations=CONVERSATION, reward=1.0), None)
    for k in (1, 3, 5):  # before each gpt message, the acknowledgement included
        engine_ids = encode_prompt(tok, CONVERSATION[:k], None)
        assert engine_ids == prompt_ids(tok, CONVERSATION[:k])
        assert seq.input_ids[:len(engine_ids)] == engine_ids
        assert seq.loss_mask[len(engine_ids) - 1] is False and seq.loss_mask[len(engine_ids)] is True


def test_pair_prompt_equals_engine_prompt():
    tok = byte_tokenizer()
    pair = Pair(id="p", prompt=CONVERSATION[:3], chosen=CONVERSATION[3:4],
                rejected=[message(GPT, "Action: go north")])
    assert tokenize_pair(tok, pair, 10_000, 10_000).prompt_ids == encode_prompt(tok, pair.prompt, None)


def test_unknown_role_names_the_message():
    with pytest.raises(ValueError, match="message 1 has role 'system'"):
        to_chat([message(HUMAN, "a"), {"from": "system", "value": "b"}])
