"""LoRA runs: options are checked, a checkpoint is a usable merged model plus the adapter, and a LoRA run
resumes exactly. (That both trainers train LoRA alike is in test_packed.py.)"""

from __future__ import annotations

import pytest
import torch
from tiny import tiny_llama
from transformers import LlamaForCausalLM

from fasteto.data.tokenized import TokenizedPair
from fasteto.trainer import (
    TrainConfig,
    apply_lora,
    load_checkpoint,
    reference_logps,
    save_checkpoint,
    step_dir,
    train_dpo,
)

T, F = True, False
# peft 0.21 still calls transformers' deprecated name
pytestmark = [
    pytest.mark.usefixtures("one_thread"),  # tiny matrices: one thread is much faster on a shared CPU
    pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning"),
]


def make_pairs(n: int = 4) -> list[TokenizedPair]:
    g = torch.Generator().manual_seed(0)
    shared = torch.randint(1, 64, (5,), generator=g).tolist()

    def ids(k: int) -> list[int]:
        return torch.randint(1, 64, (k,), generator=g).tolist()

    return [TokenizedPair(f"p{i}", shared + ids(2), ids(4), [T, T, F, T], ids(3 + i % 2), [T] * (3 + i % 2))
            for i in range(n)]


def lora_llama(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)  # the draw of A
    return apply_lora(tiny_llama(), rank=4, alpha=8.0)


def test_options_are_checked() -> None:
    with pytest.raises(ValueError, match="rank must be ≥ 1"):
        apply_lora(tiny_llama(), rank=0)
    with pytest.raises(ValueError, match=r"\['qkv'\] are not modules of LlamaForCausalLM.*'q_proj'"):
        apply_lora(tiny_llama(), target_modules=["qkv"])
    model = apply_lora(tiny_llama(), rank=2, target_modules=["q_proj", "lm_head"])
    pairs = make_pairs(2)
    ref = reference_logps(tiny_llama(), pairs, pad_id=0, micro_batch_size=2)
    with pytest.raises(NotImplementedError, match="lm_head out of the LoRA target modules"):
        train_dpo(model, pairs, ref, TrainConfig(global_batch=2, trainer="fast"))
    train_dpo(model, pairs, ref, TrainConfig(global_batch=2, trainer="plain"))  # the plain trainer can


def test_checkpoint_is_the_merged_model_plus_the_adapter(tmp_path) -> None:
    model = lora_llama()
    pairs = make_pairs()
    ref = reference_logps(tiny_llama(), pairs, pad_id=0, micro_batch_size=4)
    train_dpo(model, pairs, ref, TrainConfig(lr=1e-2, epochs=1, global_batch=2, beta=0.5))
    path = save_checkpoint(model, tmp_path / "lora")
    assert (path / "config.json").is_file() and (path / "model.safetensors").is_file()
    assert (path / "adapter" / "adapter_config.json").is_file()
    merged = load_checkpoint(path)
    assert isinstance(merged, LlamaForCausalLM) and not any("lora" in k for k in merged.state_dict())
    ids = torch.tensor([[3, 17, 42, 5, 9, 11]])
    model.eval()
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        with model.disable_adapter():
            base = model(input_ids=ids).logits
        got = merged.eval()(input_ids=ids).logits
    assert (expected - base).abs().max() > 1e-3  # training moved the adapter
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_lora_run_resumes_exactly(tmp_path) -> None:
    pairs = make_pairs()
    ref = reference_logps(tiny_llama(), pairs, pad_id=0, micro_batch_size=4)
    cfg = TrainConfig(lr=1e-2, epochs=2, global_batch=2, beta=0.5, token_budget=32)
    full_model = lora_llama()
    full = train_dpo(full_model, pairs, ref, cfg)
    first = train_dpo(lora_llama(), pairs, ref, TrainConfig(**{**cfg.__dict__, "stop_at_step": 2}),
                      checkpoint_dir=tmp_path)
    resumed_model = lora_llama(seed=1)  # another draw of A: the adapter comes from the checkpoint
    rest = train_dpo(resumed_model, pairs, ref, cfg, resume_from=step_dir(tmp_path, 2))
    assert [h["loss"] for h in first + rest] == [h["loss"] for h in full]
    resumed = dict(resumed_model.named_parameters())
    for name, p in full_model.named_parameters():
        assert torch.equal(resumed[name], p), name
    save_checkpoint(tiny_llama(), tmp_path / "plain")
    with pytest.raises(FileNotFoundError, match="holds no LoRA adapter"):
        load_checkpoint(tmp_path / "plain", model=lora_llama())
