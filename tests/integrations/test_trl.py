"""``fasteto.integrations.trl``: TRL's DPOTrainer vs the fused drop-in on a tiny random Llama, and the
multi-turn model-token masks.

Tolerance (fp32 on CPU): losses, metrics and every trainable parameter's gradient agree with stock TRL to
``rtol=1e-4, atol=1e-6`` (both compute fp32 log-softmax from the same GEMMs, chunked differently; the
observed gap is ~1e-8).
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

pytest.importorskip("trl", reason="trl is not installed (pip install trl==1.16.0, fasteto's bench extra)")

from datasets import Dataset  # noqa: E402
from peft import LoraConfig  # noqa: E402
from tiny import CHATML, byte_tokenizer, tiny_llama  # noqa: E402
from trl import DPOConfig, DPOTrainer  # noqa: E402

from fasteto.integrations.trl import (  # noqa: E402
    NOT_LOGGED,
    FusedDPOTrainer,
    check_trl_version,
    remove_fasteto_lm_head,
)

pytestmark = pytest.mark.usefixtures("one_thread")
TOL = {"rtol": 1e-4, "atol": 1e-6}


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


SINGLE_TURN = [  # odd, unequal lengths so that rows pad differently
    {"prompt": [user("hi there")], "chosen": [assistant("hello!")], "rejected": [assistant("go away now")]},
    {"prompt": [user("2+2?")], "chosen": [assistant("4")], "rejected": [assistant("five, or so")]},
    {"prompt": [user("name a colour")], "chosen": [assistant("teal")], "rejected": [assistant("")]},
]
TEXT = [{"prompt": "The sky is", "chosen": " blue.", "rejected": " made of cheese, I think."},
        {"prompt": "One, two,", "chosen": " three", "rejected": " seven"}]
# Record 0: both continuations start with the same reply; rejected has an empty observation and ends on one.
MULTI_TURN = [
    {"prompt": [user("go")],
     "chosen": [assistant("a"), user("o"), assistant("b")],
     "rejected": [assistant("a"), user(""), assistant("cd"), user("ok")]},
    {"prompt": [user("look")],
     "chosen": [assistant("open it"), user("it is open"), assistant("take key")],
     "rejected": [assistant("wait"), user("nothing happens"), assistant("wait")]},
]


def dpo_config(tmp_path, **overrides) -> DPOConfig:
    settings = dict(output_dir=str(tmp_path), per_device_train_batch_size=2, bf16=False, use_cpu=True,
                    report_to=[], gradient_checkpointing=False, disable_tqdm=True, max_length=None,
                    save_strategy="no")
    return DPOConfig(**(settings | overrides))


def one_step(trainer) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict[str, float], dict]:
    """Loss, gradients and metrics of one compute_loss + backward on all the trainer's records."""
    dataset = trainer.train_dataset
    batch = trainer.data_collator([dataset[i] for i in range(len(dataset))])
    trainer.model.train()
    loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()
    grads = {name: p.grad for name, p in trainer.model.named_parameters() if p.requires_grad}
    metrics = {name: values[-1] for name, values in trainer._metrics["train"].items()}
    return loss.detach(), grads, metrics, batch


CASES = {
    "full-sigmoid-text": dict(data=TEXT, tie=False, peft=False, loss_type=["sigmoid"]),
    "full-tied-ipo+sft": dict(data=SINGLE_TURN, tie=True, peft=False, loss_type=["ipo", "sft"]),
    "lora-sigmoid-precomputed-ref": dict(data=SINGLE_TURN, tie=False, peft=True, loss_type=["sigmoid"],
                                         precompute_ref_log_probs=True),
}


@pytest.mark.parametrize("case", CASES)
def test_matches_stock_trl(tmp_path, case):
    spec = dict(CASES[case])
    data, tie, peft = spec.pop("data"), spec.pop("tie"), spec.pop("peft")
    tokenizer = byte_tokenizer()
    policy = tiny_llama(vocab_size=len(tokenizer), seed=0, tie=tie)
    results = {}
    for name, cls in (("stock", DPOTrainer), ("fused", FusedDPOTrainer)):
        kwargs = dict(args=dpo_config(tmp_path / name, **spec), train_dataset=Dataset.from_list(data),
                      processing_class=tokenizer)
        if peft:  # random (not zero) B so the policy differs from the reference (adapter disabled)
            kwargs["peft_config"] = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0,
                                               init_lora_weights=False)
        else:
            kwargs["ref_model"] = tiny_llama(vocab_size=len(tokenizer), seed=1, tie=tie)
        trainer = cls(copy.deepcopy(policy), **kwargs)
        results[name] = (trainer, *one_step(trainer))
    (stock, stock_loss, stock_grads, stock_metrics, stock_batch) = results["stock"]
    (fused, loss, grads, metrics, batch) = results["fused"]

    assert torch.equal(batch["completion_mask"], stock_batch["completion_mask"])
    if "ref_chosen_logps" in batch:  # computed at construction, through each trainer's own head
        for key in ("ref_chosen_logps", "ref_rejected_logps"):
            torch.testing.assert_close(batch[key], stock_batch[key], **TOL)
    assert torch.isfinite(loss) and loss.item() != 0.0
    torch.testing.assert_close(loss, stock_loss, **TOL)
    assert grads.keys() == stock_grads.keys() and len(grads) > 0
    for name, grad in grads.items():
        assert grad is not None and torch.isfinite(grad).all(), name
        torch.testing.assert_close(grad, stock_grads[name], **TOL, msg=lambda m, n=name: f"{n}: {m}")
    assert math.isnan(metrics["entropy"])  # the fused head ran (it does not compute entropy)
    reported = [key for key in stock_metrics if key not in NOT_LOGGED]
    assert {"rewards/chosen", "rewards/margins", "logps/chosen", "logits/chosen"} <= set(reported)
    for key in reported:
        assert metrics[key] == pytest.approx(stock_metrics[key], rel=1e-4, abs=1e-6), key
    fused.log({})
    assert not set(NOT_LOGGED) & set(fused.state.log_history[-1])
    assert "rewards/margins" in fused.state.log_history[-1]


def test_remove_head_restores_trl_forward(tmp_path):
    tokenizer = byte_tokenizer()
    model = tiny_llama(vocab_size=len(tokenizer))
    trainer = FusedDPOTrainer(model, ref_model=tiny_llama(vocab_size=len(tokenizer), seed=1),
                              args=dpo_config(tmp_path), train_dataset=Dataset.from_list(TEXT),
                              processing_class=tokenizer)
    trl_forward = model.__dict__["_fasteto_lm_head"]["previous"]  # TRL's own per-instance fused head
    assert model.__dict__["forward"] is not trl_forward
    remove_fasteto_lm_head(model)
    assert model.__dict__["forward"] is trl_forward and "_fasteto_lm_head" not in model.__dict__
    trainer._add_fused_heads()
    assert model.__dict__["forward"] is not trl_forward


# --- model_tokens_only ------------------------------------------------------------------------------


def fused_trainer(tmp_path, data, tokenizer=None, config=None, **kwargs) -> FusedDPOTrainer:
    tokenizer = tokenizer or byte_tokenizer()
    vocab = len(tokenizer)
    return FusedDPOTrainer(tiny_llama(vocab_size=vocab), ref_model=tiny_llama(vocab, seed=1),
                           args=dpo_config(tmp_path, per_device_train_batch_size=1, **(config or {})),
                           train_dataset=Dataset.from_list(data), processing_class=tokenizer, **kwargs)


# Byte tokenizer: one token per character, one per special token (<s> = <|im_start|>, </s> = <|im_end|>).
# MULTI_TURN[0]'s prompt "<s>user\ngo</s>\n" is 10 tokens, + generation prompt "<s>assistant\n" 11 = 21.
# chosen:   "a</s>\n" 3 model | "<s>user\no</s>\n" 9 | "<s>assistant\n" 11 | "b</s>\n" 3 model      = 26
# rejected: "a</s>\n" 3 model | "<s>user\n</s>\n" 8  | "<s>assistant\n" 11 | "cd</s>\n" 4 model
#           | "<s>user\nok</s>\n" 10                                                               = 36
# A reply's model tokens end at its </s>: the "\n" after it is the template's (the engine writes it).
CHOSEN_MASK = [0] * 21 + [1, 1, 0] + [0] * (9 + 11) + [1, 1, 0]  # 47 tokens
REJECTED_MASK = [0] * 21 + [1, 1, 0] + [0] * (8 + 11) + [1, 1, 1, 0] + [0] * 10  # 57 tokens
TRUNCATIONS = {  # DPOConfig fields -> the collated completion_mask [2, T] of MULTI_TURN[0]
    "none": ({}, [CHOSEN_MASK + [0] * 10, REJECTED_MASK]),
    "keep_start-30": ({"max_length": 30}, [CHOSEN_MASK[:30], REJECTED_MASK[:30]]),
    "keep_end-30": ({"max_length": 30, "truncation_mode": "keep_end"},
                    [CHOSEN_MASK[-30:], REJECTED_MASK[-30:]]),
}


@pytest.mark.parametrize("truncation", TRUNCATIONS)
def test_model_token_mask_by_hand(tmp_path, truncation):
    config, expected = TRUNCATIONS[truncation]
    expected = torch.tensor(expected)
    trainer = fused_trainer(tmp_path, MULTI_TURN, config=config, model_tokens_only=True)
    batch = trainer.data_collator([trainer.train_dataset[0]])
    assert torch.equal(batch["completion_mask"], expected)

    # The policy's summed log-probs over exactly those tokens, from full logits by hand.
    trainer.model.train()
    trainer.compute_loss(trainer.model, batch)
    with torch.no_grad():
        logits = trainer.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logps = torch.log_softmax(logits[:, :-1].double(), -1).gather(-1, batch["input_ids"][:, 1:, None])[..., 0]
    by_hand = (logps * expected[:, 1:]).sum(-1)
    metrics = trainer._metrics["train"]
    assert metrics["logps/chosen"][-1] == pytest.approx(by_hand[0].item(), rel=1e-5)
    assert metrics["logps/rejected"][-1] == pytest.approx(by_hand[1].item(), rel=1e-5)


def test_stock_trl_counts_observations(tmp_path):
    tokenizer = byte_tokenizer()
    stock = DPOTrainer(tiny_llama(len(tokenizer)), ref_model=tiny_llama(len(tokenizer), seed=1),
                       args=dpo_config(tmp_path), train_dataset=Dataset.from_list(MULTI_TURN),
                       processing_class=tokenizer)
    stock_mask = stock.data_collator([stock.train_dataset[0]])["completion_mask"]
    assert torch.equal(stock_mask[0], torch.tensor([0] * 21 + [1] * 26 + [0] * 10))


def test_train_loop_keeps_masks_and_trl_metrics(tmp_path):
    # trainer.train() drops the dataset columns a trainer does not declare (remove_unused_columns=True); the
    # collator raises KeyError if the mask columns were dropped.
    trainer = fused_trainer(tmp_path, MULTI_TURN, model_tokens_only=True)
    trainer.args.max_steps, trainer.args.logging_steps = 2, 1
    trainer.train()
    logged = trainer.state.log_history[0]
    assert {"loss", "rewards/margins", "logps/chosen", "logits/chosen"} <= set(logged)
    assert not set(NOT_LOGGED) & set(logged)


def test_model_token_mask_on_single_turn_drops_only_the_glue_after_eos(tmp_path):
    # stock TRL also counts ChatML's "\n" after </s>, the last completion token; nothing else differs
    trainer = fused_trainer(tmp_path, SINGLE_TURN, model_tokens_only=True)
    plain = fused_trainer(tmp_path / "plain", SINGLE_TURN)
    records = range(len(SINGLE_TURN))
    mask = trainer.data_collator([trainer.train_dataset[i] for i in records])["completion_mask"]
    stock = plain.data_collator([plain.train_dataset[i] for i in records])["completion_mask"]
    last = stock.shape[1] - 1 - stock.flip(1).argmax(1)  # each row's last completion token
    expected = stock.clone()
    expected[torch.arange(len(expected)), last] = 0
    assert torch.equal(mask, expected)


# --- refusals ---------------------------------------------------------------------------------------


def test_refuses_softcapped_logits(tmp_path):
    tokenizer = byte_tokenizer()
    model = tiny_llama(len(tokenizer))
    model.config.final_logit_softcapping = 30.0
    with pytest.raises(NotImplementedError, match="final_logit_softcapping"):
        FusedDPOTrainer(model, ref_model=tiny_llama(len(tokenizer), seed=1), args=dpo_config(tmp_path),
                        train_dataset=Dataset.from_list(TEXT), processing_class=tokenizer)


def test_refuses_wpo_weighting(tmp_path):
    tokenizer = byte_tokenizer()
    with pytest.raises(NotImplementedError, match="use_weighting"):
        FusedDPOTrainer(tiny_llama(len(tokenizer)), args=dpo_config(tmp_path, use_weighting=True),
                        train_dataset=Dataset.from_list(TEXT), processing_class=tokenizer)


def test_model_tokens_only_refuses_text_data(tmp_path):
    with pytest.raises(ValueError, match="record 0: model_tokens_only=True needs conversational"):
        fused_trainer(tmp_path, TEXT, model_tokens_only=True)


def test_model_tokens_only_names_the_record_it_cannot_mask(tmp_path):
    # A template that re-renders earlier turns (drops a "...##" plan from every message but the last), as
    # templates that strip earlier reasoning do: record 1's first reply renders differently once followed.
    tokenizer = byte_tokenizer()
    strip_plans = "{{ m['content'] if loop.last else m['content'].split('##')[-1] }}"
    tokenizer.chat_template = CHATML.replace("{{ m['content'] }}", strip_plans)
    data = [MULTI_TURN[0], {**MULTI_TURN[1], "chosen": [assistant("plan##act"), user("ok"), assistant("b")]}]
    with pytest.raises(ValueError, match=r"train dataset record 1, chosen: .*message 1 \(assistant\)"):
        fused_trainer(tmp_path, data, tokenizer=tokenizer, model_tokens_only=True)


def test_model_tokens_only_refuses_a_foreign_collator(tmp_path):
    with pytest.raises(ValueError, match="pass data_collator=None"):
        fused_trainer(tmp_path, MULTI_TURN, model_tokens_only=True, data_collator=lambda examples: examples)


def test_trl_version_range():
    with pytest.raises(ImportError, match=r"trl>=1\.16\.0.*pip install trl==1\.16\.0"):
        check_trl_version("1.15.2")
    with pytest.warns(UserWarning, match="tested with trl>=1.16.0,<1.17.0"):
        check_trl_version("1.17.0")
    check_trl_version("1.16.0")
