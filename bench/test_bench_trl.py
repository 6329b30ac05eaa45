"""One DPO optimiser step: TRL's ``DPOTrainer`` vs fasteto's drop-in ``FusedDPOTrainer``, side by side.

Run: ``.venv/bin/python -m pytest bench/test_bench_trl.py -s`` (rows go to bench/results/trl.jsonl, the
ratios are printed at the end). Nothing here asserts on speed.

**Same work for both.** Per case: one randomly initialised Llama (``torch.manual_seed(0)``, so both
contenders start from the same weights), the same synthetic single-turn conversational pairs (the byte
tokenizer of tests/tiny.py, one token per character, so lengths are exact), the same ``DPOConfig`` (sigmoid
loss, β 0.1, fp32, no gradient checkpointing, ``precompute_ref_log_probs=True`` so no reference forward runs
in a step, AdamW at TRL's defaults). The drop-in differs only in how per-token log-probs are computed:
``fused_token_logprobs`` on the completion positions, with an explicit backend per contender: ``fused``
("torch" on CPU, "triton" on CUDA; "auto" without the native library) and ``fused-native`` (the C++ CPU
backend, skipped where it is not built), instead of TRL 1.16's own chunked head, which on CPU scores
every position with an eager torch emulation of its Triton kernel (and also computes entropy and top-1,
which the drop-in does not log). On CUDA TRL runs that Triton kernel on completion positions only, so the
CPU ratios say little about CUDA.
Every step's loss is recorded (``losses``): they must agree across contenders, a check of the same work.

**Timing.** One step is ``trainer.training_step`` (forward, backward) + ``optimizer.step()`` +
``zero_grad`` on one fixed batch holding all the case's pairs. One warm-up step (optimiser state,
allocator growth), one step under the memory meter, then ``rounds`` timed steps (pytest-benchmark
``pedantic``): median, min and max seconds per step.

**Peak memory** of one step above what is live before it (weights, AdamW state): CPU, the running sum of
torch's allocation events under ``torch.profiler`` (``_common.peak_memory``); CUDA
``max_memory_allocated``. Tensor memory only.

Cases, sized for a few minutes on 2 shared CPU cores: ``tiny`` (the tests' 2-layer Llama, vocabulary 259:
integration overhead, the head is negligible) and ``smollm2-4l`` (SmolLM2-135M's config — vocabulary
49152, hidden 576, 9 heads / 3 KV heads, MLP 1536, tied embeddings — with 4 of its 30 layers, so that the
LM head is a large share of the step, as in the real model at ETO's long sequences).
"""

from __future__ import annotations

import importlib.metadata
import random
import string
from pathlib import Path

import pytest
import torch
from _common import device_description, peak_memory, record_result

pytest.importorskip("trl", reason="trl is not installed (pip install trl==1.16.0, fasteto's bench extra)")

from datasets import Dataset  # noqa: E402
from tiny import byte_tokenizer  # noqa: E402  (tests/tiny.py; pytest's pythonpath has tests/)
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402
from trl import DPOConfig, DPOTrainer  # noqa: E402

from fasteto.integrations.trl import FusedDPOTrainer  # noqa: E402
from fasteto.ops.logprob import fused_token_logprobs  # noqa: E402

RESULTS = "trl"
CASES = {
    # model: LlamaConfig fields; data: pairs per step and characters (= tokens) per part; rounds: timed steps
    "tiny": dict(model=dict(vocab_size=259, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2),
                 pairs=4, prompt=48, chosen=96, rejected=80, rounds=5),
    "smollm2-4l": dict(model=dict(vocab_size=49152, hidden_size=576, intermediate_size=1536,
                                  num_hidden_layers=4, num_attention_heads=9, num_key_value_heads=3,
                                  tie_word_embeddings=True, rope_theta=100000.0, rms_norm_eps=1e-5),
                       pairs=2, prompt=128, chosen=256, rejected=224, rounds=5),
}
# Explicit backends, so that each row says what ran: "fused" is what impl="auto" picks without the native
# library (triton on CUDA, torch on CPU); "fused-native" the C++ CPU backend, skipped where it cannot run.
_FUSED_IMPL = "triton" if torch.cuda.is_available() else "torch"
CONTENDERS = {"trl": (DPOTrainer, {}), "fused": (FusedDPOTrainer, {"logprob_impl": _FUSED_IMPL}),
              "fused-native": (FusedDPOTrainer, {"logprob_impl": "native"})}


def native_unavailable() -> str | None:
    """Why ``fused_token_logprobs(impl="native")`` cannot run here, or None."""
    if torch.cuda.is_available():
        return "the native backend is CPU-only and this run is on CUDA"
    try:
        fused_token_logprobs(torch.randn(2, 4), torch.randn(3, 4), torch.tensor([0, 2]), impl="native")
    except (RuntimeError, ValueError, ImportError, OSError) as error:
        return str(error)
    return None


def dpo_settings(pairs: int) -> dict:
    """The DPOConfig fields both contenders get (besides output_dir)."""
    return dict(per_device_train_batch_size=pairs, beta=0.1, loss_type=["sigmoid"], max_length=None,
                precompute_ref_log_probs=True, bf16=False, gradient_checkpointing=False, learning_rate=1e-5,
                report_to=[], save_strategy="no", disable_tqdm=True, use_cpu=not torch.cuda.is_available())


def synthetic_pairs(n: int, prompt: int, chosen: int, rejected: int) -> Dataset:
    """``n`` conversational pairs of random text with exactly the given character counts."""
    rng = random.Random(0)

    def text(length):
        return "".join(rng.choice(string.ascii_lowercase + " .,") for _ in range(length))

    return Dataset.from_list([
        {"prompt": [{"role": "user", "content": text(prompt)}],
         "chosen": [{"role": "assistant", "content": text(chosen)}],
         "rejected": [{"role": "assistant", "content": text(rejected)}]} for _ in range(n)])


def make_step(case: dict, kind: str, output_dir: Path):
    """A closure running one optimiser step on a fixed batch, the trainer, and its losses so far."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(max_position_embeddings=4096, **case["model"]))
    cls, extra = CONTENDERS[kind]
    args = DPOConfig(output_dir=str(output_dir), **dpo_settings(case["pairs"]))
    data = synthetic_pairs(case["pairs"], case["prompt"], case["chosen"], case["rejected"])
    trainer = cls(model, args=args, train_dataset=data, processing_class=byte_tokenizer(), **extra)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(trainer.train_dataset))])
    trainer.create_optimizer()
    trainer.current_gradient_accumulation_steps = 1  # set by Trainer's loop, read by training_step
    losses: list[float] = []

    def step():
        loss = trainer.training_step(trainer.model, batch)
        trainer.optimizer.step()
        trainer.optimizer.zero_grad(set_to_none=True)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        losses.append(loss.item())

    return step, trainer, batch, losses


@pytest.mark.parametrize("kind", CONTENDERS)
@pytest.mark.parametrize("case_name", CASES)
def test_dpo_step(benchmark, bench_report, tmp_path, case_name, kind):
    case = CASES[case_name]
    if kind == "fused-native" and (reason := native_unavailable()) is not None:
        pytest.skip(f"impl='native' cannot run: {reason}")
    step, trainer, batch, losses = make_step(case, kind, tmp_path)
    device = trainer.args.device
    step()  # warm-up
    peak_bytes, memory_method = peak_memory(step, device)
    benchmark.pedantic(step, rounds=case["rounds"], iterations=1)
    stats = benchmark.stats.stats if benchmark.stats is not None else None  # None: --benchmark-disable
    cls, extra = CONTENDERS[kind]
    row = record_result(RESULTS, {
        "bench": "trl_dpo_step", "case": case_name, "contender": kind, "trainer": cls.__name__,
        "trainer_kwargs": extra, "dpo_config": dpo_settings(case["pairs"]), "model": case["model"],
        "pairs_per_step": case["pairs"], "chars": {k: case[k] for k in ("prompt", "chosen", "rejected")},
        "rows_x_tokens": list(batch["input_ids"].shape),
        "completion_tokens": int(batch["completion_mask"].sum()),
        "device": device_description(device), "torch_threads": torch.get_num_threads(),
        "trl": importlib.metadata.version("trl"), "peft": importlib.metadata.version("peft"),
        "peak_bytes": peak_bytes, "memory_method": memory_method, "losses": losses,
        "seconds_median": stats and stats.median, "seconds_min": stats and stats.min,
        "seconds_max": stats and stats.max, "rounds": stats and stats.rounds,
    })
    bench_report.rows[(case_name, kind)] = row
    baseline = bench_report.rows.get((case_name, "trl"))
    if kind != "trl" and baseline is not None:
        bench_report.lines.append(comparison(baseline, row))


def comparison(trl_row: dict, fused_row: dict) -> str:
    """One line: both contenders' median [min-max] step time and peak memory, and trl / fused ratios."""

    def ratio(a, b):
        return f"{a / b:.2f}x" if a and b else "n/a"

    def seconds(row):
        if row["seconds_median"] is None:
            return "n/a"
        return f"{row['seconds_median']:.3f} s [{row['seconds_min']:.3f}-{row['seconds_max']:.3f}]"

    mib = 2**20
    pairs = zip(trl_row["losses"], fused_row["losses"], strict=True)
    same = all(abs(a - b) <= 1e-4 * max(1.0, abs(a)) for a, b in pairs)
    rows, tokens = fused_row["rows_x_tokens"]
    return (f"trl dpo step {fused_row['case']} ({rows}x{tokens} tokens, {fused_row['device']}): median step "
            f"{seconds(trl_row)} trl / {seconds(fused_row)} {fused_row['contender']} "
            f"(impl {fused_row['trainer_kwargs']['logprob_impl']}) = "
            f"{ratio(trl_row['seconds_median'], fused_row['seconds_median'])}; peak memory "
            f"{trl_row['peak_bytes'] / mib:.0f} / {fused_row['peak_bytes'] / mib:.0f} MiB = "
            f"{ratio(trl_row['peak_bytes'], fused_row['peak_bytes'])}; losses agree: {same}")
