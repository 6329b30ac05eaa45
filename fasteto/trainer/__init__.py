"""Reference trainer for ETO: SFT and DPO on right-padded batches, losses, reference log-probs,
checkpoints. Packed/fused trainers must match its losses."""

from fasteto.trainer.batching import epoch_order, micro_batches, pad_pairs, pad_sequences
from fasteto.trainer.checkpoint import (
    latest_checkpoint,
    load_checkpoint,
    load_trainer_state,
    load_weights_into,
    save_checkpoint,
    step_dir,
)
from fasteto.trainer.logprobs import (
    autocast_context,
    load_reference,
    reference_logps,
    save_reference,
    sequence_logps,
    token_logps,
)
from fasteto.trainer.loop import (
    NonFiniteLossError,
    TrainConfig,
    lr_factor,
    make_scheduler,
    train_dpo,
    train_sft,
)
from fasteto.trainer.losses import (
    dpo_sigmoid_loss,
    dpo_sigmoid_norm_loss,
    ipo_loss,
    preference_loss,
    sft_loss,
)

__all__ = [
    "NonFiniteLossError",
    "TrainConfig",
    "autocast_context",
    "dpo_sigmoid_loss",
    "dpo_sigmoid_norm_loss",
    "epoch_order",
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
    "save_checkpoint",
    "save_reference",
    "sequence_logps",
    "sft_loss",
    "step_dir",
    "token_logps",
    "train_dpo",
    "train_sft",
]
