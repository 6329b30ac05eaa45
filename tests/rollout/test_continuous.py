"""ContinuousEngine: the plain engine's replies, with rows joining and leaving the batch at any step."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_engine import conversations, with_example_and_turns
from test_explore import CONTEXT_LEN, ReplayEngine, ToyEnv, toy_envs, toy_script  # noqa: F401 (fixture)
from tiny import byte_tokenizer, tiny_llama
from transformers import MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

from fasteto.data.types import GPT, HUMAN, message
from fasteto.rollout.continuous import ContinuousEngine, Reply
from fasteto.rollout.engine import GenerationConfig, TransformersEngine
from fasteto.rollout.explore import explore
from fasteto.rollout.slot_kv import PackedStep, SlotStore

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tokenizer():
    return byte_tokenizer()


@pytest.fixture(scope="module")
def model(tokenizer):
    return tiny_llama(len(tokenizer), hidden_size=48)


def next_turn(convs, replies, turn):
    return [c + [message(GPT, r), message(HUMAN, f"Observation: turn {turn} done.")]
            for c, r in zip(convs, replies, strict=True)]


def test_packed_step_layout_is_exact():
    store = SlotStore(num_layers=1, num_slots=3, kv_heads=1, head_dim=2, dtype=torch.float32,
                      device=torch.device("cpu"), capacity=8)
    step = PackedStep.build(store, slots=[2, 0, 1], starts=[5, 0, 3], lengths=[1, 3, 2])
    assert torch.equal(step.token_slot, torch.tensor([2, 0, 0, 0, 1, 1]))
    assert torch.equal(step.token_pos, torch.tensor([5, 0, 1, 2, 3, 4]))
    assert torch.equal(step.last, torch.tensor([0, 3, 5]))
    keys = torch.arange(12, dtype=torch.float32).reshape(1, 1, 6, 2)
    step.update(keys, -keys, layer_idx=0)
    assert torch.equal(store.keys[0][0, 0, :3], keys[0, 0, 1:4])
    assert torch.equal(store.keys[0][2, 0, 5], keys[0, 0, 0])
    assert torch.equal(store.values[0][1, 0, 3:5], -keys[0, 0, 4:6])
    store.reserve(20)
    assert store.capacity == 20 and torch.equal(store.keys[0][1, 0, 3:5], keys[0, 0, 4:6])


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral"])
def test_greedy_equals_the_plain_engine_over_several_turns(family, tokenizer):
    small = dict(vocab_size=len(tokenizer), hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2)
    torch.manual_seed(0)
    model = {"llama": lambda: tiny_llama(len(tokenizer), hidden_size=48),
             "qwen2": lambda: Qwen2ForCausalLM(Qwen2Config(**small)).eval(),
             "mistral": lambda: MistralForCausalLM(MistralConfig(**small)).eval()}[family]()
    cfg = GenerationConfig(max_new_tokens=10)
    plain, engine = TransformersEngine(model, tokenizer, batch_size=4), ContinuousEngine(model, tokenizer, 4)
    convs = conversations()
    for turn in range(3):
        expected = plain.generate(convs, cfg)
        assert engine.generate(convs, cfg) == expected
        convs = next_turn(convs, expected, turn)
    assert engine.prefilled_tokens < sum(len(plain.encode(c)) for c in convs)
    assert model.config._attn_implementation == "sdpa"  # switched back after every step


def test_more_conversations_than_slots_and_rows_ending_at_different_steps(model, tokenizer):
    """Four conversations through two slots; then rows with different reply budgets leave the batch at
    different steps while the others go on. Every reply equals the plain engine's."""
    cfg = GenerationConfig(max_new_tokens=9)
    engine = ContinuousEngine(model, tokenizer, slots=2)
    assert engine.generate(conversations(), cfg) == TransformersEngine(model, tokenizer).generate(
        conversations(), cfg)
    budgets = {"a": 3, "b": 7, "c": 12}
    for (key, n), conv in zip(budgets.items(), conversations(), strict=False):
        engine = engine if key != "a" else ContinuousEngine(model, tokenizer, slots=3)
        engine.submit(conv, GenerationConfig(max_new_tokens=n), key=key)
    ended_at = {}
    while engine.busy:
        for reply in engine.step():
            ended_at[reply.key] = (engine.forwards, reply.text)
    # c starts with a's whole prompt: it waits one step and copies a's KV instead of recomputing it
    assert [step for step, _ in ended_at.values()] == [3, 7, 13] and engine.copied_tokens > 0
    for (key, n), conv in zip(budgets.items(), conversations(), strict=False):
        expected = TransformersEngine(model, tokenizer).generate([conv], GenerationConfig(max_new_tokens=n))
        assert ended_at[key][1] == expected[0], key
    assert engine.decoded_tokens == 2 + 6 + 11  # each row fed its tokens, and none after it ended


def test_rows_join_a_running_batch_mid_decode(model, tokenizer):
    """A row submitted while two others are decoding joins at the next step; all three replies equal
    the plain engine's, and its forward ran all three rows together."""
    cfg = GenerationConfig(max_new_tokens=12)
    convs = conversations()[:3]
    expected = TransformersEngine(model, tokenizer).generate(convs, cfg)
    engine = ContinuousEngine(model, tokenizer, slots=3)
    engine.submit(convs[0], cfg, key="a")
    engine.submit(convs[1], cfg, key="b")
    got = {r.key: r.text for r in engine.step() + engine.step()}
    engine.submit(convs[2], cfg, key="c")
    while engine.busy:
        got.update({r.key: r.text for r in engine.step()})
    assert [got["a"], got["b"], got["c"]] == expected


def test_an_episode_keeps_its_slot_and_reuses_its_kv(model, tokenizer):
    cfg = GenerationConfig(max_new_tokens=6)
    engine = ContinuousEngine(model, tokenizer, slots=2)
    conv = conversations()[2]
    engine.submit(conv, cfg, key="ep")
    (reply,) = [r for _ in range(cfg.max_new_tokens) for r in engine.step()]
    before = engine.prefilled_tokens
    conv = next_turn([conv], [reply.text], 0)[0]
    engine.submit(conv, cfg, key="ep")
    while engine.busy:
        engine.step()
    prompt = len(TransformersEngine(model, tokenizer).encode(conv))
    assert 0 < engine.prefilled_tokens - before < prompt // 4  # the history came from the slot
    with pytest.raises(RuntimeError, match="all 2 slots"):
        engine.submit(conv, cfg, key="x")
        engine.submit(conv, cfg, key="y")


def test_a_new_episode_copies_the_shared_prefix_from_another_slot(model, tokenizer):
    cfg = GenerationConfig(max_new_tokens=4)
    head = [message(HUMAN, "You are an agent. " * 20), message(GPT, "OK")]
    first, second = head + [message(HUMAN, "Task one.")], head + [message(HUMAN, "Task two!")]
    engine = ContinuousEngine(model, tokenizer, slots=2)
    engine.generate([first], cfg)
    engine.submit(first, cfg, key="busy")  # holds its slot: the second episode gets the other one
    engine.submit(second, cfg, key="new")
    while engine.busy:
        engine.step()
    assert engine.copied_tokens > 100
    with pytest.raises(RuntimeError, match="release"):
        engine.generate([second], cfg)
    engine.release("busy")
    engine.release("new")
    assert engine.generate([second], cfg) == TransformersEngine(model, tokenizer).generate([second], cfg)


def test_two_new_episodes_share_their_prefix_within_one_step(model, tokenizer):
    cfg = GenerationConfig(max_new_tokens=4)
    head = [message(HUMAN, "You are an agent. " * 20), message(GPT, "OK")]
    convs = [head + [message(HUMAN, "Task one.")], head + [message(HUMAN, "Task two!")]]
    engine = ContinuousEngine(model, tokenizer, slots=2)
    replies = engine.generate(convs, cfg)
    lengths = [len(TransformersEngine(model, tokenizer).encode(c)) for c in convs]
    assert engine.prefilled_tokens < sum(lengths) - 100  # the second waited a step and copied the head
    assert replies == TransformersEngine(model, tokenizer).generate(convs, cfg)


def test_truncated_prompts_match_the_plain_engine(model, tokenizer):
    convs = conversations() + [with_example_and_turns()]
    limit = len(TransformersEngine(model, tokenizer).encode(convs[-1])) - 20
    cfg = GenerationConfig(max_new_tokens=6)
    assert ContinuousEngine(model, tokenizer, max_context=limit).generate(convs, cfg) == \
        TransformersEngine(model, tokenizer, max_context=limit).generate(convs, cfg)


def test_update_weights_drops_every_slot(model, tokenizer):
    cfg = GenerationConfig(max_new_tokens=8)
    engine = ContinuousEngine(model, tokenizer)
    engine.generate(conversations(), cfg)
    other = tiny_llama(len(tokenizer), hidden_size=48, seed=7)
    engine.update_weights(other)
    assert all(len(v) == 0 for v in engine.store.valid)
    assert engine.generate(conversations(), cfg) == TransformersEngine(other, tokenizer).generate(
        conversations(), cfg)


def test_sampling_is_seeded_per_row_and_keeps_training_mode(tokenizer):
    model = tiny_llama(len(tokenizer), hidden_size=48).train()
    cfg = GenerationConfig(max_new_tokens=10, greedy=False, temperature=1.0, top_p=0.9, seed=123)
    first = ContinuousEngine(model, tokenizer, slots=4).generate(conversations(), cfg)
    torch.manual_seed(999)
    # Two slots instead of four: other rows share the steps, the samples stay the same.
    assert ContinuousEngine(model, tokenizer, slots=2).generate(conversations(), cfg) == first
    other = GenerationConfig(max_new_tokens=10, greedy=False, temperature=1.0, seed=124)
    assert ContinuousEngine(model, tokenizer).generate(conversations(), other) != first
    assert model.training


def test_bf16_model_decodes(tokenizer):
    model = tiny_llama(len(tokenizer), hidden_size=48).to(torch.bfloat16)
    engine = ContinuousEngine(model, tokenizer, slots=2)
    replies = engine.generate(conversations(), GenerationConfig(max_new_tokens=5))
    assert len(replies) == 4 and engine.store.dtype == torch.bfloat16
    assert np.all([len(ids) <= 5 for ids in engine.last_token_ids])


# ------------------------------------------------------------------------------------ the explorer

class ContinuousReplay:
    """``ReplayEngine``'s scripted replies behind the continuous interface, one reply per step, so rows
    finish at different steps; records what was released."""

    def __init__(self, replay):
        self.replay, self.rows, self.released = replay, [], []

    @property
    def busy(self):
        return bool(self.rows)

    def submit(self, conversation, cfg, key, seed=None):
        assert key not in [k for k, _, _ in self.rows]
        self.rows.append((key, conversation, cfg))

    def step(self):
        (key, conv, cfg), self.rows = self.rows[0], self.rows[1:]
        return [Reply(key, self.replay.generate([conv], cfg)[0], [len(conv)])]

    def release(self, key):
        self.released.append(key)


def test_explorer_continuous_crashes_retries_and_releases(toy_envs, tmp_path):  # noqa: F811
    ToyEnv.reset_crashes["f"] = 1
    replay = ReplayEngine({"Task f": toy_script("win"), "Task x": toy_script("wait", "boom"),
                           "Task a": toy_script("wait", "wait", "win")})
    engine = ContinuousReplay(replay)
    report = explore(toy_envs, engine, ["x", "f", "a"], tmp_path / "s.jsonl", GenerationConfig(),
                     concurrency=2, progress=False)
    x, f, a = report.trajectories
    assert (x.reward, f.reward, a.reward) == (None, 1.0, 1.0)
    assert report.crashes == 1 + 3 and report.new_episodes == 3 and report.env_steps == 2 * 3 + 1 + 3
    assert len(engine.released) == len(set(engine.released)) == 3 + 2 + 1  # every attempt, crashed or not
    assert not engine.busy and all(env.closed for env in toy_envs.made)
    assert report.reply_ids[("a", None)] == [[CONTEXT_LEN], [CONTEXT_LEN + 2], [CONTEXT_LEN + 4]]
    again = explore(toy_envs, engine, ["x", "f", "a"], tmp_path / "s.jsonl", GenerationConfig(),
                    concurrency=2, progress=False)
    assert again.resumed == 3 and again.new_episodes == 0


def test_explorer_with_the_continuous_engine_stores_what_the_plain_engine_stores(
        model, tokenizer, toy_envs, tmp_path):  # noqa: F811
    cfg = GenerationConfig(max_new_tokens=8)
    tasks = ["a", "b", "c", "d", "e"]
    plain = explore(toy_envs, TransformersEngine(model, tokenizer, batch_size=3), tasks, tmp_path / "p.jsonl",
                    cfg, concurrency=3, progress=False)
    continuous = explore(toy_envs, ContinuousEngine(model, tokenizer, slots=3), tasks, tmp_path / "c.jsonl",
                         cfg, concurrency=3, progress=False)
    assert [t.to_record(with_reward=True) for t in continuous.trajectories] == \
        [t.to_record(with_reward=True) for t in plain.trajectories]
    assert continuous.reply_ids == plain.reply_ids and len(plain.reply_ids) == 5
    assert continuous.env_steps == plain.env_steps == 15 and continuous.env_seconds > 0


def test_engine_dtype_option(monkeypatch):
    from fasteto.rollout import continuous

    assert continuous.engine_dtype("model", torch.float32) == torch.float32
    assert continuous.engine_dtype("bfloat16", torch.float32) == torch.bfloat16
    assert continuous.engine_dtype("auto", torch.float32, device="cuda") == torch.bfloat16
    monkeypatch.setattr(continuous, "cpu_has_bf16", lambda: False)
    assert continuous.engine_dtype("auto", torch.float32) == torch.float32
    monkeypatch.setattr(continuous, "cpu_has_bf16", lambda: True)
    assert continuous.engine_dtype("auto", torch.float32) == torch.bfloat16

