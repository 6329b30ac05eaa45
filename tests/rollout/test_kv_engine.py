"""KVCacheEngine: the same replies as the plain TransformersEngine, computed from cached prefixes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_engine import conversations, with_example_and_turns
from tiny import byte_tokenizer, end_turn_after, tiny_llama

from fasteto.data.types import GPT, HUMAN, message
from fasteto.rollout.engine import GenerationConfig, TransformersEngine
from fasteto.rollout.kv_engine import KVCacheEngine
from fasteto.rollout.prefix_cache import PrefixCache, common_prefix

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny ops: one thread is much faster


@pytest.fixture(scope="module")
def tokenizer():
    return byte_tokenizer()


@pytest.fixture(scope="module")
def model(tokenizer):
    return tiny_llama(len(tokenizer), hidden_size=48)


def kv_of(n: int, fill: float = 0.0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(torch.full((1, 2, n, 4), fill), torch.full((1, 2, n, 4), fill))]


def ids(*tokens: int) -> np.ndarray:
    return np.asarray(tokens, dtype=np.int64)


# ------------------------------------------------------------------------------------- prefix cache

def test_common_prefix():
    assert common_prefix(ids(1, 2, 3), ids(1, 2, 4, 5)) == 2
    assert common_prefix(ids(1, 2), ids(1, 2, 3)) == 2
    assert common_prefix(ids(7), ids(1)) == 0
    assert common_prefix(ids(), ids(1)) == 0


def test_lookup_finds_the_longest_prefix_and_put_replaces_the_extended_entry():
    cache = PrefixCache(max_tokens=100)
    short = cache.put(ids(1, 2), kv_of(2), prompt_len=2)
    long = cache.put(ids(1, 2, 3, 4), kv_of(4), prompt_len=4)
    assert cache.lookup(ids(1, 2, 3, 9)) == (long, 3)
    assert cache.lookup(ids(1, 5)) in [(short, 1), (long, 1)]
    assert cache.lookup(ids(9)) == (None, 0)
    longer = cache.put(ids(1, 2, 3, 4, 5), kv_of(5), prompt_len=5, replaces=long)
    assert cache.entries == [short, longer] and cache.tokens == 7
    assert [k.shape for k, _ in longer.prefix_kv(3)] == [torch.Size([1, 2, 3, 4])]
    with pytest.raises(ValueError, match="KV covers 2 tokens but 3 ids"):
        cache.put(ids(1, 2, 3), kv_of(2), prompt_len=3)


def test_eviction_drops_least_recently_used_and_keeps_the_newest():
    cache = PrefixCache(max_tokens=6)
    a = cache.put(ids(1, 1, 1), kv_of(3), prompt_len=3)
    cache.put(ids(2, 2, 2), kv_of(3), prompt_len=3)
    cache.lookup(ids(1, 1))  # a is now more recent than the second entry
    c = cache.put(ids(3, 3), kv_of(2), prompt_len=2)
    assert cache.entries == [a, c]
    big = cache.put(ids(*range(10)), kv_of(10), prompt_len=10)
    assert cache.entries == [big]  # alone over the budget, but the newest stays
    cache.clear()
    assert cache.entries == [] and cache.tokens == 0


# ---------------------------------------------------------------------------------------- the engine

def test_greedy_equals_the_plain_engine_over_several_turns(model, tokenizer):
    """Different prompt lengths, batches of 3 (rows leave as they end), three turns of one dialogue."""
    cfg = GenerationConfig(max_new_tokens=10)
    plain, cached = TransformersEngine(model, tokenizer, batch_size=4), KVCacheEngine(model, tokenizer, 3)
    convs = conversations()
    for turn in range(3):
        expected = plain.generate(convs, cfg)
        assert cached.generate(convs, cfg) == expected
        convs = [c + [message(GPT, r), message(HUMAN, f"Observation: turn {turn} done.")]
                 for c, r in zip(convs, expected, strict=True)]
    prompt_tokens = sum(len(plain.encode(c)) for c in convs)
    assert cached.prefilled_tokens < prompt_tokens  # earlier turns came from the cache
    assert cached.cache.hits > 0


def test_rows_end_at_different_steps(tokenizer):
    """Each row ends right after its first token with an id divisible by 7: rows leave the decode batch
    at different steps, and the replies still equal the plain engine's."""
    marked = list(range(0, len(tokenizer), 7))
    model = end_turn_after(tiny_llama(len(tokenizer), hidden_size=48, seed=2), tokenizer, marked)
    cfg = GenerationConfig(max_new_tokens=40)
    engine = KVCacheEngine(model, tokenizer, batch_size=4)
    replies = engine.generate(conversations(), cfg)
    assert replies == TransformersEngine(model, tokenizer).generate(conversations(), cfg)
    lengths = [len(tokenizer(r, add_special_tokens=False)["input_ids"]) for r in replies]
    assert len(set(lengths)) > 1, replies  # rows ended at different steps
    assert engine.decoded_tokens < 4 * cfg.max_new_tokens  # and left the batch when they did


def test_truncated_prompts_match_the_plain_engine(model, tokenizer):
    convs = conversations() + [with_example_and_turns()]
    plain = TransformersEngine(model, tokenizer, max_context=len(TransformersEngine(model, tokenizer)
                                                                  .encode(convs[-1])) - 20)
    cached = KVCacheEngine(model, tokenizer, max_context=plain.max_context)
    cfg = GenerationConfig(max_new_tokens=6)
    assert cached.generate(convs, cfg) == plain.generate(convs, cfg)


def test_update_weights_drops_the_cache(model, tokenizer):
    cfg = GenerationConfig(max_new_tokens=8)
    engine = KVCacheEngine(model, tokenizer)
    engine.generate(conversations(), cfg)
    other = tiny_llama(len(tokenizer), hidden_size=48, seed=7)
    engine.update_weights(other)
    assert engine.cache.entries == []
    assert engine.generate(conversations(), cfg) == TransformersEngine(other, tokenizer).generate(
        conversations(), cfg)


def test_seeded_sampling_is_reproducible_and_keeps_training_mode(tokenizer):
    model = tiny_llama(len(tokenizer), hidden_size=48).train()
    engine = KVCacheEngine(model, tokenizer, batch_size=2)
    cfg = GenerationConfig(max_new_tokens=10, greedy=False, temperature=1.0, top_p=0.9, seed=123)
    first = engine.generate(conversations(), cfg)
    torch.manual_seed(999)
    assert KVCacheEngine(model, tokenizer, batch_size=2).generate(conversations(), cfg) == first
    assert engine.generate(conversations(), GenerationConfig(max_new_tokens=10, greedy=False,
                                                             temperature=1.0, seed=124)) != first
    assert model.training
    with pytest.raises(ValueError, match="end with a human message"):
        engine.generate([[message(HUMAN, "a"), message(GPT, "b")]], cfg)


# ------------------------------------------------------------------ a real model in a real environment

@pytest.mark.slow
def test_smollm2_on_sciworld_matches_the_plain_engine_turn_by_turn(smollm2, sciworld_env):
    """SmolLM2-135M plays three turns of two ScienceWorld tasks; the KV and continuous engines write the
    same token ids as the plain engine."""
    from fasteto.models.load import load_model, load_tokenizer
    from fasteto.rollout.continuous import ContinuousEngine

    model, tokenizer = load_model(smollm2), load_tokenizer(smollm2)
    cfg = GenerationConfig(max_new_tokens=16)
    plain, cached = TransformersEngine(model, tokenizer, batch_size=2), KVCacheEngine(model, tokenizer, 2)
    continuous = ContinuousEngine(model, tokenizer, slots=2)
    tasks = ("11_0", "21_52")
    convs = [sciworld_env.prompt.context(sciworld_env.reset(task)) for task in tasks]
    played: list[list[str]] = [[], []]
    plain_prompt_tokens = 0
    for _ in range(3):
        plain_prompt_tokens += sum(len(plain.encode(c)) for c in convs)
        replies = cached.generate(convs, cfg)
        assert replies == plain.generate(convs, cfg) == continuous.generate(convs, cfg)
        assert cached.last_token_ids == plain.last_token_ids == continuous.last_token_ids
        for i, (task, reply) in enumerate(zip(tasks, replies, strict=True)):
            sciworld_env.reset(task)  # one simulator for both episodes: replay this one so far
            for old in played[i]:
                sciworld_env.step(old)
            step = sciworld_env.step(reply)
            played[i].append(reply)
            convs[i] = convs[i] + [message(GPT, reply), message(HUMAN, step.observation)]
    # The shared instruction and example are encoded once, then each turn only its new tokens.
    assert cached.prefilled_tokens < plain_prompt_tokens / 4
    assert continuous.prefilled_tokens < plain_prompt_tokens / 4
    assert continuous.copied_tokens > 500  # the second episode took the instruction and example
