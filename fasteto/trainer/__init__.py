"""ETO's trainer: SFT and DPO with the plain padded reference or the fast packed trainer
(``TrainConfig.trainer``), losses, reference log-probs, LoRA, checkpoints, FSDP2 data parallelism."""

from fasteto.trainer.batching import epoch_order, micro_batches, pad_pairs, pad_sequences
from fasteto.trainer.checkpoint import (
    latest_checkpoint,
    load_checkpoint,
    load_trainer_state,
    load_weights_into,
    save_checkpoint,
    step_dir,
)
from fasteto.trainer.config import TRAINERS, TrainConfig
from fasteto.trainer.distributed import setup_distributed, shard_model
from fasteto.trainer.logprobs import (
    autocast_context,
    load_reference,
    reference_logps,
    save_reference,
    sequence_logps,
    token_logps,
)
from fasteto.trainer.loop import NonFiniteLossError, lr_factor, make_scheduler
from fasteto.trainer.lora import apply_lora
from fasteto.trainer.losses import (
    PREFERENCE_LOSSES,
    dpo_sigmoid_loss,
    dpo_sigmoid_norm_loss,
    hinge_loss,
    ipo_loss,
    preference_loss,
    sft_loss,
)
from fasteto.trainer.packed import reference_logps_packed
from fasteto.trainer.stages import train_dpo, train_sft

__all__ = [
    "NonFiniteLossError",
    "PREFERENCE_LOSSES",
    "TRAINERS",
    "TrainConfig",
    "apply_lora",
    "autocast_context",
    "dpo_sigmoid_loss",
    "dpo_sigmoid_norm_loss",
    "epoch_order",
    "hinge_loss",
    "ipo_loss",
    "latest_checkpoint",
    "load_checkpoint",
    "load_reference",
    "load_trainer_state",
    "load_weights_into",
    "lr_factor",
    "make_scheduler",
    "micro_batches",
    "pad_pairs",
    "pad_sequences",
    "preference_loss",
    "reference_logps",
    "reference_logps_packed",
    "save_checkpoint",
    "save_reference",
    "sequence_logps",
    "setup_distributed",
    "shard_model",
    "sft_loss",
    "step_dir",
    "token_logps",
    "train_dpo",
    "train_sft",
]
