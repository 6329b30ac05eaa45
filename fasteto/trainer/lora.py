"""LoRA through peft: wrap a causal LM, and the two views of a LoRA run that checkpoints need.

Checkpoint choice: a LoRA checkpoint folder is a *usable model*: ``config.json`` + ``model.safetensors``
hold the base weights with the adapter merged in (W + (α/r)·B·A), so ``load_checkpoint(path)``, the
rollout engines and the next ETO phase load it like any other model. The adapter itself is kept beside
them in ``adapter/`` (peft's ``adapter_config.json`` + ``adapter_model.safetensors``) so that a LoRA run
can resume: the base weights do not change during training, so the run's starting model plus the adapter
restores the exact training state. (``checkpoint.save_checkpoint`` / ``load_weights_into`` call this module
for peft models.)
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

ADAPTER_DIR = "adapter"
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")


def apply_lora(
    model: nn.Module,
    rank: int = 16,
    alpha: float = 32.0,
    dropout: float = 0.0,
    target_modules: Sequence[str] = DEFAULT_TARGETS,
) -> nn.Module:
    """Wrap a transformers causal LM with LoRA adapters (peft's ``get_peft_model``): only the adapters
    train, the base weights are frozen.

    Args:
        model: a causal LM (modified in place: peft swaps the target linears for LoRA layers).
        rank: r, the adapter's inner dimension (≥ 1). alpha: α; the update is scaled by α/r.
        dropout: dropout on the adapter's input during training (keep 0 for exact reproducibility
            between the fast and the plain trainer: they draw different random masks).
        target_modules: names of the linear modules to adapt (default: the attention projections). The
            LM head cannot be one of them with the fast trainer (its fused op reads the head's weight).

    Returns:
        The ``peft.PeftModel``; train it, save it with ``checkpoint.save_checkpoint`` (see the module
        docstring). peft initialises B to 0, so the wrapped model starts equal to ``model``; the draw
        of A uses torch's global RNG.
    """
    import peft

    if rank < 1:
        raise ValueError(f"lora rank must be ≥ 1, got {rank}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"lora dropout must be in [0, 1), got {dropout}")
    if not target_modules:
        raise ValueError("lora target_modules is empty; name at least one linear module (e.g. q_proj)")
    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    if missing := [t for t in target_modules if t not in names]:
        raise ValueError(f"lora target_modules {missing} are not modules of {type(model).__name__}; "
                         f"linear layers it has: {sorted(_linear_names(model))}")
    config = peft.LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout,
                             target_modules=list(target_modules), task_type="CAUSAL_LM")
    return peft.get_peft_model(model, config)


def _linear_names(model: nn.Module) -> set[str]:
    return {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, nn.Linear)}


def is_lora(model: nn.Module) -> bool:
    """Whether ``model`` is a peft LoRA wrapper (as ``apply_lora`` returns)."""
    try:
        import peft
    except ImportError:
        return False
    return isinstance(model, peft.PeftModel)


def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The base model's state dict with every LoRA delta added into its weight, under the base model's
    own key names (what ``save_pretrained`` of the un-adapted model would write). The model is unchanged."""
    from peft.tuners.lora import LoraLayer

    base = model.get_base_model()
    adapter = model.active_adapter
    state = {}
    for key, value in base.state_dict().items():
        if ".lora_" in key:
            continue
        state[key.replace(".base_layer.", ".")] = value
    with torch.no_grad():
        for name, layer in base.named_modules():
            if isinstance(layer, LoraLayer) and adapter in layer.lora_A:
                if layer.merged:
                    raise ValueError(f"{name}: the adapter is merged into the weights already; unmerge it "
                                     "(model.unmerge_adapter()) before saving")
                weight = state[f"{name}.weight"]
                state[f"{name}.weight"] = (weight + layer.get_delta_weight(adapter).to(weight.dtype)).detach()
    return state


def save_lora(model: nn.Module, folder: Path) -> None:
    """Write the merged weights (``save_pretrained`` of the base model) and the adapter
    (``folder/adapter``) into ``folder``."""
    model.get_base_model().save_pretrained(folder, state_dict=merged_state_dict(model))
    model.save_pretrained(folder / ADAPTER_DIR)


def load_adapter(model: nn.Module, folder: str | os.PathLike) -> None:
    """Load the adapter saved by ``save_lora`` in ``folder`` into the LoRA model ``model`` (in place)."""
    import peft
    from safetensors.torch import load_file

    file = Path(folder) / ADAPTER_DIR / "adapter_model.safetensors"
    if not file.is_file():
        raise FileNotFoundError(f"{file} not found: {folder} holds no LoRA adapter (merged weights only, or "
                                "not a LoRA run), so a LoRA run cannot resume from it")
    result = peft.set_peft_model_state_dict(model, load_file(str(file)))
    missing = [k for k in result.missing_keys if "lora_" in k]
    if missing or result.unexpected_keys:
        raise RuntimeError(f"{file} does not match the LoRA model: missing {missing[:5]}, "
                           f"unexpected {list(result.unexpected_keys)[:5]}; use the same rank and targets")
