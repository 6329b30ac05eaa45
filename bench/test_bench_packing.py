"""Token-tree packing: planning and packing time at scale, and the tokens trees save on ETO pairs.

Run: ``.venv/bin/python -m pytest bench/test_bench_packing.py -s`` (rows go to bench/results/packing.jsonl).

- ``synthetic``: ~10M tokens of seeded ETO-shaped pairs (``synthetic_eto_pairs``), planned into
  token-budget micro-batches and packed; times for each, and the sharing they get.
- ``expert``: pairs built by ETO's pair rule from the cached expert trajectories of ScienceWorld and
  ALFWorld (``~/.cache/fasteto/expert``, current cache version), each paired with a synthetic failed
  exploration that follows the expert for its first k turns and then continues with another expert's
  turns; tokenised with the SmolLM2 tokenizer. Skipped without the cache or the model.
- ``run``: the pairs of a real ETO run folder (``$FASTETO_BENCH_RUN/iter-*/pairs_*.json``), tokenised
  the same way. Skipped when the variable is unset.

Token counts: ``plain`` = every full sequence once (no padding, no sharing), ``packed`` = the tree,
``padded`` = the plain ``[2B, T]`` padded layout over the same micro-batches. Speed is never asserted.
"""

from __future__ import annotations

import dataclasses
import os
import random
from pathlib import Path

import numpy as np
import pytest
from _common import device_description, record_result
from _pairs import default_tokenizer, expert_pairs

from fasteto.config import DPOConfig
from fasteto.data.tokenized import TokenizedPair
from fasteto.packing import pack_pairs, plan_micro_batches, sharing_stats

BUDGET = 32768  # tokens per micro-batch (after sharing)
GLOBAL_BATCH = DPOConfig().global_batch  # pairs per optimiser step, as the trainer plans them
VOCAB = 49152  # SmolLM2's vocabulary
RESULTS = "packing"
DEVICE = device_description("cpu")  # packing runs on the host


def _turn(rng: np.random.Generator, reply: bool) -> tuple[list[int], list[bool]]:
    n = int(rng.integers(20, 81) if reply else rng.integers(20, 201))
    return rng.integers(VOCAB, size=n).tolist(), [reply] * n


def _side(rng: np.random.Generator, start: list, prompt_len: int) -> tuple[list[int], list[bool], list]:
    """Turns (reply, observation, reply, ...) from ``start`` on until the full sequence reaches a length
    drawn from 1k-4k tokens; the last turn is cut there."""
    target = max(int(rng.integers(1000, 4001)), prompt_len + 100)
    turns = list(start)
    while prompt_len + sum(len(ids) for ids, _ in turns) < target:
        turns.append(_turn(rng, reply=len(turns) % 2 == 0))
    ids = [t for piece, _ in turns for t in piece][: target - prompt_len]
    mask = [m for _, piece in turns for m in piece][: target - prompt_len]
    return ids, mask, turns


def synthetic_eto_pairs(total_tokens: int = 10_000_000, seed: int = 0) -> list[TokenizedPair]:
    """Seeded ETO-shaped pairs until their plain tokens reach ``total_tokens``.

    Shape: one of two instruction prefixes (1000 and 1200 tokens, like two environments' instruction
    exchanges), then a per-task message of 30-150 tokens; chosen and rejected share their first 0-2 turns
    (reply 20-80 model tokens, observation 20-200 tokens) and then differ; each full sequence is 1k-4k
    tokens. One task in five is explored twice: its second pair repeats the prompt and the chosen side.
    """
    rng = np.random.default_rng(seed)
    instructions = [rng.integers(VOCAB, size=n).tolist() for n in (1000, 1200)]
    pairs: list[TokenizedPair] = []
    total, last = 0, None
    while total < total_tokens:
        if last is None or rng.random() >= 0.2:
            task = rng.integers(VOCAB, size=int(rng.integers(30, 151))).tolist()
            prompt = instructions[int(rng.integers(2))] + task
            chosen, chosen_mask, turns = _side(rng, [], len(prompt))
            last = (prompt, chosen, chosen_mask, turns)
        prompt, chosen, chosen_mask, turns = last
        rejected, rejected_mask, _ = _side(rng, turns[: 2 * int(rng.integers(0, 3))], len(prompt))
        pairs.append(TokenizedPair(len(pairs), prompt, chosen, chosen_mask, rejected, rejected_mask))
        total += 2 * len(prompt) + len(chosen) + len(rejected)
    return pairs


def _seconds(benchmark) -> dict[str, float]:
    stats = getattr(benchmark, "stats", None)
    if not stats:  # --benchmark-disable
        return {}
    return {"min_s": stats.stats.min, "median_s": stats.stats.median, "rounds": stats.stats.rounds}


def _pack_all(pairs: list[TokenizedPair], plan: list[list[int]], share_across: bool = True) -> dict[str, int]:
    """Pack every micro-batch; totals of the layout sizes the kernels see."""
    out = {"entries_M": 0, "contributions_K": 0, "kv_slots_Nk": 0, "segments_S": 0, "max_N": 0}
    for batch in plan:
        packed, _, _ = pack_pairs([pairs[i] for i in batch], share_across=share_across)
        out["entries_M"] += packed.logp_rows.numel()
        out["contributions_K"] += packed.contrib_seq.numel()
        out["kv_slots_Nk"] += packed.kv_index.numel()
        out["segments_S"] += packed.num_segments
        out["max_N"] = max(out["max_N"], packed.num_tokens)
    return out


def _global_batches(n: int, seed: int = 0) -> list[list[int]]:
    order = np.random.default_rng([seed, 0]).permutation(n).tolist()
    return [order[i:i + GLOBAL_BATCH] for i in range(0, n, GLOBAL_BATCH)]


def _plan_steps(pairs: list[TokenizedPair], share_across: bool) -> list[list[int]]:
    """Micro-batches as the trainer plans them: per global batch of a seeded epoch order."""
    plan = []
    for step in _global_batches(len(pairs)):
        plan += [[step[i] for i in mb] for mb in plan_micro_batches([pairs[i] for i in step], BUDGET,
                                                                    share_across=share_across)]
    return plan


def _record(row: dict) -> dict:
    return record_result(RESULTS, {"device": DEVICE, **row})


def _sharing_rows(case: str, pairs: list[TokenizedPair], plan_all: list[list[int]],
                  report, label: str = "") -> list[dict]:
    """Token counts with sharing across pairs / only within pairs, for one plan over all pairs and for
    the trainer's per-global-batch plans."""
    rows = []
    whole = {True: plan_all, False: plan_micro_batches(pairs, BUDGET, share_across=False)}
    steps = {share: _plan_steps(pairs, share) for share in (True, False)}
    for scope, plans in (("all pairs", whole), (f"global batches of {GLOBAL_BATCH}", steps)):
        for share, plan in plans.items():
            stats = sharing_stats(pairs, plan, share_across=share)
            row = {"case": case, "planned_over": scope, "share_across": share, "budget": BUDGET,
                   **stats.as_dict(), "fill": stats.packed_tokens / (BUDGET * stats.micro_batches),
                   **_pack_all(pairs, plan, share)}
            rows.append(row)
            report.lines.append(
                f"packing {case}{label} [{scope}, share_across={share}]: {stats.summary()}; fill "
                f"{row['fill']:.1%}; {row['entries_M']} log-prob entries for {row['contributions_K']} "
                f"counted tokens; {row['kv_slots_Nk']} gathered-KV slots")
    return rows


# ------------------------------------------------------------------------------ synthetic, ~10M tokens


@pytest.fixture(scope="module")
def synthetic() -> list[TokenizedPair]:
    return synthetic_eto_pairs()


def _timing_line(what: str, row: dict) -> str:
    took = f"{row['median_s']:.2f} s median of {row['rounds']}" if "median_s" in row else "not timed"
    return f"packing synthetic: {what} {row['plain_tokens']} plain tokens of {row['records']} pairs: {took}"


def test_plan_synthetic(benchmark, bench_report, synthetic) -> None:
    plan = benchmark.pedantic(plan_micro_batches, args=(synthetic, BUDGET), rounds=3, iterations=1)
    stats = sharing_stats(synthetic, plan)
    row = _record({"case": "synthetic", "what": "plan", "budget": BUDGET, **stats.as_dict(),
                   **_seconds(benchmark)})
    bench_report.lines.append(_timing_line("plan", row))


def test_pack_synthetic(benchmark, bench_report, synthetic) -> None:
    plan = plan_micro_batches(synthetic, BUDGET)
    sizes = benchmark.pedantic(_pack_all, args=(synthetic, plan), rounds=3, iterations=1)
    stats = sharing_stats(synthetic, plan)
    row = _record({"case": "synthetic", "what": "pack", "budget": BUDGET, **stats.as_dict(), **sizes,
                   **_seconds(benchmark)})
    bench_report.lines.append(_timing_line(f"pack {stats.micro_batches} micro-batches of", row))


def test_tokens_saved_synthetic(benchmark, bench_report, synthetic) -> None:
    plan = plan_micro_batches(synthetic, BUDGET)
    benchmark.pedantic(sharing_stats, args=(synthetic, plan), rounds=1, iterations=1)
    for row in _sharing_rows("synthetic", synthetic, plan, bench_report):
        _record({**row, "what": "sharing"})


# ------------------------------------------------------------------------------ real pairs


@pytest.fixture(scope="module")
def tokenizer():
    return default_tokenizer()


def _tokenize(tokenizer, pairs, max_prompt: int) -> list[TokenizedPair]:
    from fasteto.data.tokenize import tokenize_pairs

    out, _ = tokenize_pairs(tokenizer, pairs, max_prompt, DPOConfig().max_target)
    return out


@pytest.mark.parametrize("env", ["sciworld", "alfworld"])
def test_tokens_saved_expert_pairs(benchmark, bench_report, tokenizer, env) -> None:
    limit = int(os.environ.get("FASTETO_BENCH_EXPERT_PAIRS", 256))
    pairs = expert_pairs(env, limit, random.Random(0))
    whole = _tokenize(tokenizer, pairs, 1 << 20)
    for max_prompt in (DPOConfig().max_prompt, None):
        # the tokenizer keeps the prompt's last max_prompt tokens and nothing else depends on it
        tokens = [dataclasses.replace(p, prompt_ids=p.prompt_ids[-max_prompt:]) if max_prompt else p
                  for p in whole]
        plan = plan_micro_batches(tokens, BUDGET)
        for row in _sharing_rows(f"expert-{env}", tokens, plan, bench_report, f" max_prompt={max_prompt}"):
            _record({**row, "max_prompt": max_prompt, "what": "sharing"})
    benchmark.pedantic(lambda: _pack_all(tokens, plan_micro_batches(tokens, BUDGET)), rounds=1, iterations=1)


def test_tokens_saved_run_folder(benchmark, bench_report, tokenizer) -> None:
    from fasteto.data.formats import read_pairs

    folder = os.environ.get("FASTETO_BENCH_RUN")
    if not folder:
        pytest.skip("FASTETO_BENCH_RUN is not set: set it to an ETO run folder (with iter-*/pairs_*.json) "
                    "to measure the pairs of a real run")
    files = sorted(Path(folder).glob("iter-*/pairs_*.json"))
    if not files:
        pytest.skip(f"FASTETO_BENCH_RUN={folder}: no iter-*/pairs_*.json files there")
    tokens = _tokenize(tokenizer, [p for f in files for p in read_pairs(f)], DPOConfig().max_prompt)
    if not tokens:
        pytest.skip(f"FASTETO_BENCH_RUN={folder}: no pair left after tokenisation")
    plan = plan_micro_batches(tokens, BUDGET)
    for row in _sharing_rows("run", tokens, plan, bench_report):
        _record({**row, "run": str(folder), "files": len(files), "what": "sharing"})
    benchmark.pedantic(lambda: _pack_all(tokens, plan_micro_batches(tokens, BUDGET)), rounds=1, iterations=1)
