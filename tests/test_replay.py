"""The replay test: training and inference must format a conversation the same way.

A tiny model is trained (fasteto's SFT stage, real chat template) until it reproduces two expert
trajectories token for token under teacher forcing, one from ScienceWorld's jar and one from ALFWorld's
TextWorld engine. Greedy exploration of those two tasks through the real engines, with the in-context
example and everything else inference shows, must then win both. Any drift between the training
rendering (``data.tokenize``) and the engine's (``rollout.engine.encode_prompt``) in roles, template,
end-of-turn handling, observation cleaning or the reply's Thought/Action shape makes a memorised reply
come out differently at inference and the episode fail.

The model is trained on each conversation as exploration shows it, the one-shot example included.
ETO's stored trajectories leave the example out, and a real model carries over what it learnt without
it; a 64-wide memoriser does not (tried: its first reply at inference came out garbled), so training on
the stored form would test the memoriser's generalisation, not the rendering.
"""

from __future__ import annotations

import shutil
from dataclasses import replace

import pytest
import torch
from tiny import tiny_llama

from fasteto.data.tokenize import tokenize_trajectories
from fasteto.envs.alfworld import AlfWorldEnv
from fasteto.envs.base import load_prompt
from fasteto.rollout.continuous import ContinuousEngine
from fasteto.rollout.engine import GenerationConfig
from fasteto.rollout.expert import make_experts
from fasteto.rollout.explore import ExploreJob, explore_many
from fasteto.trainer import TrainConfig, train_sft

pytestmark = pytest.mark.slow

SCIWORLD_TASK = "11_0"  # find-animal, variation 0: a short gold path
# look at an alarm clock under the desk lamp: its gt_traj wins in a few steps
ALFWORLD_TASK = "look_at_obj_in_light-AlarmClock-None-DeskLamp-302/trial_T20190908_192756_298295"
MAX_EPOCHS = 400


@pytest.fixture(scope="module")
def experts(alfworld_data, tmp_path_factory):
    if shutil.which("java") is None:
        pytest.skip("ScienceWorld needs Java 17: no `java` on PATH")
    pytest.importorskip("scienceworld")
    pytest.importorskip("alfworld")
    cache = tmp_path_factory.mktemp("expert-cache")
    out = {}
    for env, task, kwargs in (("sciworld", SCIWORLD_TASK, {}), ("alfworld", ALFWORLD_TASK,
                                                                 {"data": str(alfworld_data)})):
        report = make_experts(env, "train", workers=1, cache_dir=cache, env_kwargs=kwargs, progress=False,
                              task_ids=[task])
        assert [t.id for t in report.trajectories] == [task], report.summary()
        out[env] = report.trajectories[0]
    return out


def as_explored(env: str, expert):
    """The expert's conversation as exploration shows it: instruction exchange, example, task, turns."""
    context = load_prompt(env).context(expert.conversations[2]["value"])
    return replace(expert, conversations=context + expert.conversations[3:])


def memorised(model, seqs) -> bool:
    """Every model token is the argmax of the model's prediction from the tokens before it."""
    with torch.no_grad():
        for seq in seqs:
            ids = torch.tensor([seq.input_ids])
            predicted = model(ids).logits[0, :-1].argmax(-1)
            mask = torch.tensor(seq.loss_mask[1:])
            if not torch.equal(predicted[mask], ids[0, 1:][mask]):
                return False
    return True


def test_a_memorised_expert_wins_through_the_real_engines(experts, alfworld_data, smollm2, tmp_path):
    from fasteto.envs.sciworld import SciWorldEnv
    from fasteto.models.load import load_tokenizer

    tokenizer = load_tokenizer(smollm2)
    seqs, dropped = tokenize_trajectories(
        tokenizer, [as_explored(env, experts[env]) for env in ("sciworld", "alfworld")], None)
    assert dropped == 0
    model = tiny_llama(vocab_size=len(tokenizer), hidden_size=64, seed=0).train()
    cfg = TrainConfig(lr=3e-3, epochs=20, global_batch=2, micro_batch=2, schedule="constant",
                      warmup_ratio=0.0, pad_id=tokenizer.pad_token_id or 0)
    for _ in range(MAX_EPOCHS // cfg.epochs):
        train_sft(model, seqs, cfg)
        if memorised(model.eval(), seqs):
            break
        model.train()
    assert memorised(model.eval(), seqs), f"not memorised after {MAX_EPOCHS} epochs"

    engine = ContinuousEngine(model, tokenizer, slots=2)
    jobs = [ExploreJob(SciWorldEnv, [SCIWORLD_TASK], tmp_path / "sciworld.jsonl"),
            ExploreJob(lambda: AlfWorldEnv(alfworld_data), [ALFWORLD_TASK], tmp_path / "alfworld.jsonl")]
    reports = explore_many(jobs, engine, GenerationConfig(max_new_tokens=128), concurrency=2, progress=False)
    for env, report in zip(("sciworld", "alfworld"), reports, strict=True):
        (played,) = report.trajectories
        expert_turns = experts[env].conversations[3:]
        assert played.reward == 1.0, (env, played.conversations[3:], expert_turns)
        model_turns = [m["value"] for m in played.conversations[3:] if m["from"] == "gpt"]
        assert model_turns == [m["value"] for m in expert_turns if m["from"] == "gpt"][: len(model_turns)]
