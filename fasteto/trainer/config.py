"""``TrainConfig``: everything one training stage needs, resolved. It inherits the run config's
``BackendOptions`` (how micro-batches run) and is built from a stage's options by ``TrainConfig.sft`` and
``TrainConfig.dpo``, so names, defaults and choices are written once, in ``fasteto.config``."""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass
from typing import Any

from fasteto.config import BackendOptions, DPOConfig, SFTConfig

_SFT, _DPO = SFTConfig(), DPOConfig()
Schedule = typing.Literal["cosine", "constant"]
Loss = typing.Literal["sigmoid", "ipo", "sigmoid_norm", "hinge"]


@dataclass
class TrainConfig(BackendOptions):
    """One training stage. Defaults are ETO's SFT settings (``SFTConfig``'s); ``TrainConfig.dpo(k)`` gives
    DPO's for iteration ``k``."""

    lr: float = _SFT.lr
    epochs: int = _SFT.epochs
    global_batch: int = _SFT.global_batch  # items per optimizer step
    micro_batch: int = _SFT.micro_batch  # plain trainer: items per forward pass; must divide global_batch
    schedule: Schedule = "cosine"  # both with linear warmup from 0
    warmup_ratio: float = _SFT.warmup_ratio  # warmup steps = ceil(ratio * total steps), as HF's Trainer
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0  # 0 disables clipping (the norm is still reported)
    beta: float = _DPO.beta[0]  # DPO β
    loss: Loss = _DPO.loss  # see losses.PREFERENCE_LOSSES
    sft_weight: float = _DPO.sft_weight  # DPO: + sft_weight x mean over pairs of chosen NLL per model token
    seed: int = 0
    bf16: bool | str = "auto"  # "auto": autocast bf16 only on CUDA with bf16; True: also on CPU
    pad_id: int = 0  # plain trainer: any valid id; padding is masked out of attention and loss
    save_every: int = 0  # checkpoint every N steps (0: only the last step of the call)
    # stop after this optimizer step (None: run all); the LR schedule still spans all epochs
    stop_at_step: int | None = None

    @classmethod
    def sft(cls, options: SFTConfig | None = None, **overrides: Any) -> TrainConfig:
        """SFT from a run's ``SFTConfig`` (default: ETO's): cosine schedule after warmup."""
        options = _SFT if options is None else options
        return cls(**{**_backend(options), "lr": options.lr, "epochs": options.epochs,
                      "global_batch": options.global_batch, "micro_batch": options.micro_batch,
                      "warmup_ratio": options.warmup_ratio, "schedule": "cosine", **overrides})

    @classmethod
    def dpo(cls, iteration: int = 1, options: DPOConfig | None = None, **overrides: Any) -> TrainConfig:
        """DPO iteration ``iteration`` (1-based) from a run's ``DPOConfig`` (default: ETO's: batch 32,
        3 epochs, constant LR after 10% warmup; β 0.1 / lr 1e-6 in iteration 1, β 0.5 / lr 5e-7 after).
        Iteration ``k`` takes the ``k``-th lr and β; the last repeats."""
        options = _DPO if options is None else options
        if iteration < 1:
            raise ValueError(f"iteration is 1-based, got {iteration}")
        if not options.lr or not options.beta:
            raise ValueError("dpo.lr and dpo.beta need at least one value each")
        lr = options.lr[min(iteration, len(options.lr)) - 1]
        beta = options.beta[min(iteration, len(options.beta)) - 1]
        return cls(**{**_backend(options), "lr": lr, "beta": beta, "loss": options.loss,
                      "sft_weight": options.sft_weight,
                      "epochs": options.epochs, "global_batch": options.global_batch,
                      "micro_batch": options.micro_batch, "warmup_ratio": options.warmup_ratio,
                      "schedule": "constant", **overrides})

    def validate(self) -> None:
        """Raise ValueError naming the first option that cannot be used, and what is allowed."""
        for f in dataclasses.fields(self):
            allowed = _choices(f.name)
            if allowed is not None and getattr(self, f.name) not in allowed:
                raise ValueError(f"{f.name} must be one of {', '.join(map(repr, allowed))}, "
                                 f"got {getattr(self, f.name)!r}")
        if self.bf16 not in (True, False, "auto"):
            raise ValueError(f"bf16 must be True, False or 'auto', got {self.bf16!r}")
        if not self.sft_weight >= 0:
            raise ValueError(f"sft_weight must be ≥ 0, got {self.sft_weight}")
        if self.global_batch < 1:
            raise ValueError(f"global_batch must be ≥ 1, got {self.global_batch}")
        if self.trainer == "plain" and (self.micro_batch < 1 or self.global_batch % self.micro_batch):
            raise ValueError(
                f"micro_batch ({self.micro_batch}) must divide global_batch ({self.global_batch})"
            )
        budget = self.token_budget
        if isinstance(budget, bool) or not isinstance(budget, int) or budget < 1:
            raise ValueError(f"token_budget must be a positive number of tokens, got {self.token_budget!r}")
        if not isinstance(self.gradient_checkpointing, bool):
            raise ValueError(
                f"gradient_checkpointing must be True or False, got {self.gradient_checkpointing!r}"
            )
        if self.epochs < 1:
            raise ValueError(f"epochs must be ≥ 1, got {self.epochs}")


def _backend(options: BackendOptions) -> dict[str, Any]:
    return {f.name: getattr(options, f.name) for f in dataclasses.fields(BackendOptions)}


def _choices(name: str) -> tuple[Any, ...] | None:
    """The allowed values of a ``Literal`` field of ``TrainConfig`` (None for other fields)."""
    tp = typing.get_type_hints(TrainConfig)[name]
    return typing.get_args(tp) if typing.get_origin(tp) is typing.Literal else None


TRAINERS = _choices("trainer")  # ("fast", "plain")
