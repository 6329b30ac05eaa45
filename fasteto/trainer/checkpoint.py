"""Checkpoints: a Hugging Face model folder (safetensors) plus, for resuming, ``trainer_state.pt``.

A checkpoint folder is written under a temporary name beside its final path and renamed into place, so a
reader never sees a half-written one. Layout::

    step-000002/
        config.json, model.safetensors (or shards + index), generation_config.json, [tokenizer files]
        trainer_state.pt   torch.save of {"optimizer", "scheduler", "step", "rng", "config", ...}
        adapter/           LoRA runs only: the peft adapter; the weights above have it merged in
                           (see ``fasteto.trainer.lora``)
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from fasteto.trainer.lora import is_lora, load_adapter, save_lora

TRAINER_STATE = "trainer_state.pt"
_STEP_DIR = re.compile(r"^step-(\d+)$")


def step_dir(checkpoint_dir: str | os.PathLike, step: int) -> Path:
    """The folder of the checkpoint taken after optimizer step ``step``."""
    return Path(checkpoint_dir) / f"step-{step:06d}"


def latest_checkpoint(checkpoint_dir: str | os.PathLike) -> Path | None:
    """The ``step-N`` folder with the highest N in ``checkpoint_dir`` (None if there is none)."""
    folder = Path(checkpoint_dir)
    if not folder.is_dir():
        return None
    found = [(int(m.group(1)), p) for p in folder.iterdir() if p.is_dir() and (m := _STEP_DIR.match(p.name))]
    return max(found)[1] if found else None


def save_checkpoint(
    model: Any,
    path: str | os.PathLike,
    trainer_state: dict[str, Any] | None = None,
    tokenizer: Any = None,
) -> Path:
    """Save ``model`` with ``save_pretrained`` (safetensors, the default of every transformers version we
    support: the ``safe_serialization`` flag is gone in transformers 5) and, if given, the tokenizer and
    ``trainer_state`` (``torch.save``), into a temp folder that is then renamed to ``path``.

    An existing ``path`` is replaced: it is moved aside, the new folder renamed in, the old one deleted.
    Returns ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    old = path.parent / f".{path.name}.old-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        if is_lora(model):
            save_lora(model, tmp)
        else:
            model.save_pretrained(tmp)
        if not any(tmp.glob("*.safetensors")):
            raise RuntimeError(f"save_pretrained wrote no .safetensors file into {tmp}")
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if trainer_state is not None:
            torch.save(trainer_state, tmp / TRAINER_STATE)
        if path.exists():
            os.replace(path, old)
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
    return path


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (path / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        raise FileNotFoundError(
            f"{path}: no model.safetensors or model.safetensors.index.json; not a checkpoint"
        )
    state: dict[str, torch.Tensor] = {}
    for name in files:
        state.update(load_file(str(path / name)))
    return state


def load_weights_into(model: torch.nn.Module, path: str | os.PathLike) -> None:
    """Copy a checkpoint's safetensors weights into ``model`` in place (same architecture).

    Keys absent from the file are accepted only when they are tied to a loaded parameter (e.g. an
    ``lm_head`` sharing the embedding); anything else missing or unexpected raises. For a LoRA model
    (``lora.apply_lora``) the checkpoint's ``adapter/`` is loaded into its adapters.
    """
    if is_lora(model):
        load_adapter(model, path)
        return
    path = Path(path)
    state = _read_weights(path)
    result = model.load_state_dict(state, strict=False)
    params = dict(model.named_parameters(remove_duplicate=False))
    loaded = {id(params[k]) for k in state if k in params}
    missing = [k for k in result.missing_keys if not (k in params and id(params[k]) in loaded)]
    if missing or result.unexpected_keys:
        raise RuntimeError(
            f"{path} does not match the model: missing {missing[:5]}, unexpected {result.unexpected_keys[:5]}"
        )


def load_checkpoint(
    path: str | os.PathLike, model: torch.nn.Module | None = None, **from_pretrained: Any
) -> Any:
    """Load a checkpoint's model. With ``model``, its weights are replaced in place and it is returned;
    otherwise ``AutoModelForCausalLM.from_pretrained(path, **from_pretrained)`` is returned."""
    if model is not None:
        load_weights_into(model, path)
        return model
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), **from_pretrained)


def load_trainer_state(path: str | os.PathLike) -> dict[str, Any]:
    """The ``trainer_state.pt`` of a checkpoint folder; FileNotFoundError says how to get one."""
    file = Path(path) / TRAINER_STATE
    if not file.is_file():
        raise FileNotFoundError(
            f"{file} not found: this checkpoint holds weights only and cannot resume training; "
            "resume from a step-N folder written by train_sft/train_dpo"
        )
    return torch.load(file, map_location="cpu", weights_only=True)


def training_state(
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    *,
    kind: str,
    step: int,
    n_items: int,
    total_steps: int,
    config: dict[str, Any],
) -> dict[str, Any]:
    """What ``trainer_state.pt`` holds: optimizer and scheduler state, the number of optimizer steps done,
    the RNG states (dropout), the run's shape (kind, items, total steps, used to refuse a mismatched
    resume) and its resolved config (for the record)."""
    rng: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    return {
        "kind": kind,
        "step": step,
        "n_items": n_items,
        "total_steps": total_steps,
        "config": config,
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "rng": rng,
    }


def restore_training(
    path: str | os.PathLike,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    *,
    kind: str,
    n_items: int,
    total_steps: int,
) -> int:
    """Restore weights, optimizer, scheduler and RNG states from a ``step-N`` folder written during a run
    of the same shape; returns the number of optimizer steps already done."""
    state = load_trainer_state(path)
    found = (state["kind"], state["n_items"], state["total_steps"])
    if found != (kind, n_items, total_steps):
        raise ValueError(
            f"{path} was saved by a {found[0]} run over {found[1]} items / {found[2]} steps, but this is a "
            f"{kind} run over {n_items} items / {total_steps} steps: resume with the same data, epochs and "
            "batch sizes"
        )
    load_weights_into(model, path)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng"]["torch"])
    if "cuda" in state["rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng"]["cuda"])
    return int(state["step"])
