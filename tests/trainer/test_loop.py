"""The training loop on a tiny random Llama, with both trainers ("plain" and "fast"): schedule,
accumulation, SFT/DPO runs, NaN handling, checkpoints and exact resume. That the two trainers compute the
same thing is tests/trainer/test_packed.py's job."""

from __future__ import annotations

import math

import pytest
import torch
import transformers
from tiny import tiny_llama

from fasteto.data.tokenized import TokenizedPair, TokenizedSequence
from fasteto.packing import plan_micro_batches
from fasteto.trainer import (
    NonFiniteLossError,
    TrainConfig,
    epoch_order,
    load_checkpoint,
    lr_factor,
    reference_logps,
    save_checkpoint,
    step_dir,
    train_dpo,
    train_sft,
)

F, T = False, True


def make_seqs(lengths: list[int], seed: int = 0) -> list[TokenizedSequence]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for i, n in enumerate(lengths):
        ids = torch.randint(1, 64, (n,), generator=g).tolist()
        mask = [F] * (n // 3) + [T] * (n - n // 3)  # a prompt, then model tokens
        out.append(TokenizedSequence(f"seq{i}", ids, mask))
    return out


def make_pairs(n: int, seed: int = 0) -> list[TokenizedPair]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        prompt = torch.randint(1, 64, (3 + i % 3,), generator=g).tolist()
        chosen = torch.randint(1, 64, (4 + i % 2,), generator=g).tolist()
        rejected = torch.randint(1, 64, (6 - i % 3,), generator=g).tolist()
        c_mask = [T] * len(chosen)
        c_mask[1] = False  # an observation token inside the continuation
        out.append(TokenizedPair(f"pair{i}", prompt, chosen, c_mask, rejected, [T] * len(rejected)))
    return out


def params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.named_parameters()}


# ---------------------------------------------------------------- schedule and config


def test_lr_factor_exact() -> None:
    # cosine, 5 steps, warmup ceil(0.3·5) = 2: step 0 → 1/3, step 1 → 2/3, then progress p = (s − 2)/3:
    # s=2: p=0 → 1; s=3: p=1/3 → (1 + cos(π/3))/2 = 0.75; s=4: p=2/3 → (1 + cos(2π/3))/2 = 0.25
    got = [lr_factor(s, 5, 0.3, "cosine") for s in range(5)]
    assert got == pytest.approx([1 / 3, 2 / 3, 1.0, 0.75, 0.25], abs=1e-12)
    # constant, 12 steps, warmup ceil(0.1·12) = 2: 1/3, 2/3, then 1
    assert [lr_factor(s, 12, 0.1, "constant") for s in range(4)] == pytest.approx([1 / 3, 2 / 3, 1.0, 1.0])
    # no warmup: constant 1 from the first step
    assert lr_factor(0, 10, 0.0, "constant") == 1.0
    # a 4-step run with ETO's SFT ratio: its first step is not at LR 0 (it was, as in Hugging Face's)
    assert lr_factor(0, 4, 0.03, "cosine") == 0.5
    # Hugging Face's schedulers (what ETO's public code ran) agree everywhere after the warmup, and
    # during it ours is theirs shifted by one step: (s + 1) / (w + 1) vs s / w
    for schedule, make in (
        ("cosine", transformers.get_cosine_schedule_with_warmup),
        ("constant", lambda opt, w, total: transformers.get_constant_schedule_with_warmup(opt, w)),
    ):
        opt = torch.optim.SGD([torch.nn.Parameter(torch.ones(1))], lr=1.0)
        warmup = math.ceil(0.03 * 97)
        hf = make(opt, warmup, 97)
        for s in range(97):
            ours = lr_factor(s, 97, 0.03, schedule)
            expected = (s + 1) / (warmup + 1) if s < warmup else hf.lr_lambdas[0](s)
            assert ours == pytest.approx(expected, abs=1e-12)
            assert ours > 0


def test_lr_sequence_seen_by_training() -> None:
    seen: list[float] = []
    cfg = TrainConfig(lr=0.1, epochs=1, global_batch=1, micro_batch=1, schedule="cosine", warmup_ratio=0.3)
    train_sft(tiny_llama(), make_seqs([5] * 5), cfg, on_step=lambda m: seen.append(m["lr"]))
    assert seen == pytest.approx([0.1 / 3, 0.2 / 3, 0.1, 0.075, 0.025], abs=1e-12)


def test_stage_configs_come_from_the_run_options() -> None:
    from fasteto.config import DPOConfig, SFTConfig

    sft = TrainConfig.sft(SFTConfig(lr=1e-3, epochs=5, trainer="plain", logprob_impl="reference",
                                    warmup_ratio=0.5), seed=7)
    assert (sft.lr, sft.epochs, sft.trainer, sft.logprob_impl, sft.warmup_ratio, sft.schedule, sft.seed) == (
        1e-3, 5, "plain", "reference", 0.5, "cosine", 7)
    options = DPOConfig(lr=[3e-6, 2e-6, 1e-6], beta=[0.2], loss="ipo", token_budget=100,
                        gradient_checkpointing=True, sft_weight=0.25)
    for k, lr in ((1, 3e-6), (3, 1e-6), (9, 1e-6)):  # the last value repeats
        d = TrainConfig.dpo(k, options, global_batch=4)
        got = (d.lr, d.beta, d.loss, d.token_budget, d.gradient_checkpointing, d.schedule, d.global_batch,
               d.sft_weight)
        assert got == (lr, 0.2, "ipo", 100, True, "constant", 4, 0.25)
    assert TrainConfig.dpo(1).sft_weight == 0.0  # ETO's DPO has no NLL term
    with pytest.raises(ValueError, match="1-based"):
        TrainConfig.dpo(0)


def test_config_presets_and_validation() -> None:
    sft = TrainConfig.sft()
    assert (sft.lr, sft.epochs, sft.global_batch, sft.schedule, sft.warmup_ratio) == (
        2e-5,
        3,
        64,
        "cosine",
        0.03,
    )
    d1, d2 = TrainConfig.dpo(1), TrainConfig.dpo(2, micro_batch=4)
    assert (d1.lr, d1.beta, d1.global_batch, d1.schedule, d1.warmup_ratio) == (1e-6, 0.1, 32, "constant", 0.1)
    assert (d2.lr, d2.beta, d2.micro_batch) == (5e-7, 0.5, 4)
    with pytest.raises(ValueError, match="must divide"):
        train_sft(tiny_llama(), make_seqs([5]), TrainConfig(global_batch=3, micro_batch=2, trainer="plain"))
    TrainConfig(global_batch=3, micro_batch=2, trainer="fast").validate()  # micro_batch unused by "fast"
    for bad, message in (
        ({"trainer": "slow"}, "trainer must be one of 'fast', 'plain', got 'slow'"),
        ({"schedule": "linear"}, "schedule must be one of 'cosine', 'constant', got 'linear'"),
        ({"bf16": "yes"}, "bf16 must be True, False or 'auto'"),
        ({"token_budget": 0}, "token_budget must be a positive number of tokens, got 0"),
        ({"attn_impl": "flash"}, "attn_impl must be one of 'auto', 'reference'.*got 'flash'"),
        ({"logprob_impl": "cuda"}, "logprob_impl must be one of 'auto', 'triton'.*got 'cuda'"),
        ({"loss": "kto"}, "loss must be one of 'sigmoid', 'ipo', 'sigmoid_norm', 'hinge', got 'kto'"),
        ({"gradient_checkpointing": "yes"}, "gradient_checkpointing must be True or False"),
        ({"sft_weight": -0.1}, "sft_weight must be ≥ 0, got -0.1"),
        ({"sft_weight": float("nan")}, "sft_weight must be ≥ 0, got nan"),
    ):
        with pytest.raises(ValueError, match=message):
            TrainConfig(**bad).validate()


# ---------------------------------------------------------------- training


@pytest.mark.parametrize("trainer", ["plain", "fast"])
def test_sft_loss_decreases(trainer: str) -> None:
    cfg = TrainConfig(lr=1e-2, epochs=6, global_batch=3, micro_batch=3, schedule="constant", warmup_ratio=0.0,
                      trainer=trainer)  # fmt: skip
    seqs = make_seqs([9, 6, 12])
    seqs[1].input_ids[:4] = seqs[0].input_ids[:4]  # a shared 4-token prefix: packed once by "fast"
    history = train_sft(tiny_llama(), seqs, cfg)
    losses = [h["loss"] for h in history]
    assert len(losses) == 6 and all(math.isfinite(x) for x in losses)
    assert losses[-1] < 0.7 * losses[0]
    keys = {"step", "epoch", "loss", "lr", "grad_norm", "tokens", "tokens_per_s", "model_tokens",
            "tokens_plain", "tokens_plain_per_s"}  # fmt: skip
    assert keys <= set(history[0])
    assert history[0]["tokens"] == (27 if trainer == "plain" else 27 - 4) and history[0]["tokens_plain"] == 27
    assert history[0]["model_tokens"] == 9 - 3 + 6 - 2 + 12 - 4


@pytest.mark.parametrize("trainer", ["plain", "fast"])
@pytest.mark.parametrize("kind", ["sft", "dpo"])
def test_accumulation_equals_one_big_batch(kind: str, trainer: str) -> None:
    # one optimizer step over 4 items of different lengths: plain: micro 2 × 2 accumulation vs micro 4 × 1;
    # fast: a token budget that cuts the 4 items into 3 or more micro-batches vs one that holds them all
    seqs, pairs = make_seqs([5, 11, 7, 14], seed=3), make_pairs(4, seed=3)
    ref = reference_logps(tiny_llama(seed=9), pairs, pad_id=0, micro_batch_size=4)
    records = seqs if kind == "sft" else pairs
    assert len(plan_micro_batches(records, 16)) >= 3 and len(plan_micro_batches(records, 1000)) == 1
    runs = []
    for micro, budget in ((2, 16), (4, 1000)):
        model = tiny_llama()
        cfg = TrainConfig(lr=1e-3, epochs=1, global_batch=4, micro_batch=micro, schedule="constant",
                          warmup_ratio=0.0, loss="sigmoid", trainer=trainer, token_budget=budget)  # fmt: skip
        if kind == "sft":
            history = train_sft(model, seqs, cfg)
        else:
            history = train_dpo(model, pairs, ref, cfg)
        grads = {k: v.grad.clone() for k, v in model.named_parameters()}  # the step's accumulated gradient
        runs.append((history[0], grads, params(model)))
    (h_a, g_a, p_a), (h_b, g_b, p_b) = runs
    assert h_a["loss"] == pytest.approx(h_b["loss"], rel=1e-6)
    # AdamW's first step moves a weight by ≈ lr·g/(|g| + 1e-8): where |g| is near 1e-8, a rounding-level
    # difference in g (packing changes the summation order) moves it by up to ~lr/100 differently
    atol = 1e-6 if trainer == "plain" else 1e-5
    for k in g_a:
        torch.testing.assert_close(g_a[k], g_b[k], rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(p_a[k], p_b[k], rtol=1e-5, atol=atol)
    if kind == "dpo":
        assert h_a["rewards/margin"] == pytest.approx(h_b["rewards/margin"], rel=1e-5, abs=1e-7)


@pytest.mark.parametrize("trainer", ["plain", "fast"])
def test_dpo_two_steps(trainer: str) -> None:
    model = tiny_llama()
    pairs = make_pairs(4)
    ref = reference_logps(model, pairs, pad_id=0, micro_batch_size=2)
    cfg = TrainConfig.dpo(1, lr=1e-3, global_batch=2, micro_batch=1, epochs=1, trainer=trainer)
    history = train_dpo(model, pairs, ref, cfg)
    assert [h["step"] for h in history] == [1, 2]
    # step 1: the policy is the reference, every log-ratio is 0 → loss log 2, rewards 0
    assert history[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert history[0]["rewards/margin"] == pytest.approx(0.0, abs=1e-5)
    for h in history:
        assert math.isfinite(h["loss"])
        for key in (
            "rewards/chosen",
            "rewards/rejected",
            "rewards/accuracy",
            "rewards/margin",
            "logps/chosen",
        ):
            assert key in h and math.isfinite(h[key])
    with pytest.raises(ValueError, match=r"ref_logps lacks pairs \[3\]"):
        train_dpo(model, pairs, {i: ref[i] for i in range(3)}, cfg)


def _nan_after(model: torch.nn.Module, good_calls: int) -> None:
    """Forward hook on the final norm (both trainers run it): hidden states become NaN after
    ``good_calls`` forward passes."""
    calls = [0]

    def hook(module, args, output):
        calls[0] += 1
        return output * float("nan") if calls[0] > good_calls else output

    model.model.norm.register_forward_hook(hook)


@pytest.mark.parametrize("trainer", ["plain", "fast"])
def test_nan_loss_names_step_ids_and_checkpoint(tmp_path, trainer: str) -> None:
    seqs = make_seqs([6, 7, 8, 9])
    # fast: a budget of 12 tokens holds one sequence, so each micro-batch is one item as with micro_batch=1
    cfg = TrainConfig(lr=1e-3, epochs=1, global_batch=2, micro_batch=1, save_every=1, trainer=trainer,
                      token_budget=12)  # fmt: skip
    model = tiny_llama()
    _nan_after(model, good_calls=2)  # step 1 (2 micro-batches) is fine, step 2's first micro-batch is not
    with pytest.raises(NonFiniteLossError) as err:
        train_sft(model, seqs, cfg, checkpoint_dir=tmp_path)
    second_step = epoch_order(4, cfg.seed, 0)[2:4]
    # the planner runs a global batch's items in token order
    first = second_step if trainer == "plain" else sorted(second_step, key=lambda i: seqs[i].input_ids)
    culprit = seqs[first[0]].id
    msg = str(err.value)
    assert "step 2" in msg and repr(culprit) in msg and str(step_dir(tmp_path, 1)) in msg
    assert err.value.step == 2 and err.value.ids == [culprit]

    model = tiny_llama()
    _nan_after(model, good_calls=0)
    with pytest.raises(NonFiniteLossError, match="step 1 .*none saved yet"):
        train_sft(model, seqs, cfg)


def test_checkpoint_round_trip(tmp_path) -> None:
    ids = torch.tensor([[3, 17, 42, 5, 9]])
    for tie in (False, True):
        model = tiny_llama(seed=1, tie=tie).eval()
        path = save_checkpoint(model, tmp_path / f"tie{tie}")
        save_checkpoint(model, path)  # overwriting an existing checkpoint is fine
        assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no temp leftovers
        with torch.no_grad():
            expected = model(input_ids=ids).logits
            fresh = load_checkpoint(path).eval()
            in_place = load_checkpoint(path, model=tiny_llama(seed=2, tie=tie)).eval()
            assert torch.equal(fresh(input_ids=ids).logits, expected)
            assert torch.equal(in_place(input_ids=ids).logits, expected)


def _run(kind: str, model, cfg, ckpt=None, resume=None):
    if kind == "sft":
        return train_sft(model, make_seqs([5, 9, 7, 6, 8]), cfg, checkpoint_dir=ckpt, resume_from=resume)
    pairs = make_pairs(5)
    ref = reference_logps(tiny_llama(seed=7), pairs, pad_id=0, micro_batch_size=5)  # same for every run
    return train_dpo(model, pairs, ref, cfg, checkpoint_dir=ckpt, resume_from=resume)


@pytest.mark.parametrize("trainer", ["plain", "fast"])
@pytest.mark.parametrize("kind", ["sft", "dpo"])
def test_resume_gives_identical_losses(tmp_path, kind: str, trainer: str) -> None:
    # 5 items, global batch 3 → 2 steps per epoch (3 + 2 items), 2 epochs → 4 steps; the break falls at an
    # epoch boundary's far side: steps 1–2 are epoch 0, steps 3–4 epoch 1
    cfg = TrainConfig(lr=1e-2, epochs=2, global_batch=3, micro_batch=1, beta=0.5, trainer=trainer,
                      token_budget=30, schedule="cosine" if kind == "sft" else "constant",
                      warmup_ratio=0.25)  # fmt: skip
    full_model = tiny_llama()
    full = _run(kind, full_model, cfg)
    first = _run(kind, tiny_llama(), TrainConfig(**{**cfg.__dict__, "stop_at_step": 2}), ckpt=tmp_path)
    resumed_model = tiny_llama(seed=123)  # weights come from the checkpoint
    rest = _run(kind, resumed_model, cfg, ckpt=tmp_path, resume=step_dir(tmp_path, 2))
    assert [h["step"] for h in full] == [1, 2, 3, 4] and [h["step"] for h in rest] == [3, 4]
    assert [h["loss"] for h in first + rest] == [h["loss"] for h in full]
    assert [h["lr"] for h in first + rest] == [h["lr"] for h in full]
    for k, v in params(full_model).items():
        assert torch.equal(v, params(resumed_model)[k]), k
    assert rest[-1]["checkpoint"] == str(step_dir(tmp_path, 4))
    with pytest.raises(ValueError, match="resume with the same data"):
        _run(kind, tiny_llama(), TrainConfig(**{**cfg.__dict__, "epochs": 3}), resume=step_dir(tmp_path, 2))


def test_run_config_offers_exactly_the_trainer_options() -> None:
    # fasteto.config stays free of torch imports, so it spells the choices out; they must not drift
    import typing

    from fasteto.config import DPOConfig, SFTConfig, TrainerOptions
    from fasteto.ops.logprob.api import IMPLS as LOGPROB_IMPLS
    from fasteto.ops.tree_attention import IMPLS as ATTN_IMPLS
    from fasteto.trainer import PREFERENCE_LOSSES, TRAINERS

    hints = typing.get_type_hints(DPOConfig)
    assert set(typing.get_args(hints["trainer"])) == set(TRAINERS)
    assert set(typing.get_args(hints["attn_impl"])) == set(ATTN_IMPLS)
    assert set(typing.get_args(hints["logprob_impl"])) == set(LOGPROB_IMPLS)
    assert set(typing.get_args(hints["loss"])) == set(PREFERENCE_LOSSES)
    options, train = TrainerOptions(), TrainConfig()
    assert (options.trainer, options.token_budget, options.attn_impl, options.logprob_impl,
            options.gradient_checkpointing) == (train.trainer, train.token_budget, train.attn_impl,
                                                train.logprob_impl, train.gradient_checkpointing)  # fmt: skip
    assert issubclass(SFTConfig, TrainerOptions) and issubclass(DPOConfig, TrainerOptions)
