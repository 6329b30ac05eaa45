"""Data-parallel training with FSDP2 (``torch.distributed.fsdp.fully_shard``) under ``torchrun``.

Usage, one process per device::

    torchrun --nproc_per_node 2 my_script.py        # my_script.py:
        env = setup_distributed()                   # gloo on CPU, nccl on CUDA
        model = shard_model(model.to(env.device), trainer="fast")
        train_dpo(model, pairs, ref, TrainConfig(trainer="fast", ...))

Every process sees the same data and the same global batches (the epoch order depends only on the seed);
each takes its share of every global batch's micro-batches (``rank_share``). Each micro-batch loss is
already normalised by the whole *global* batch, so gradients are *summed* across processes (FSDP's
default would average them): the accumulated gradient equals one process's over the whole global batch.
Step metrics are summed across processes, so every process reports the global values.

Sharding: every decoder layer is its own FSDP unit; the root unit holds the rest (embedding, final norm,
LM head) and must be the module whose ``forward`` the trainer calls, because FSDP gathers a unit's
parameters only around its forward. The plain trainer calls the causal LM; the fast trainer calls the
hidden states and the LM head weight through :class:`~fasteto.models.packed.PackedLogps`, so for it the
root is that wrapper (``shard_model`` returns it; pass it to the trainer as the model).

Not supported yet in multi-process runs: checkpoints and resuming (the trainer refuses them).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from fasteto.models.packed import PackedLogps, causal_lm

TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device


def setup_distributed(backend: str | None = None) -> DistEnv:
    """Join the process group that ``torchrun`` describes in the environment (``RANK``, ``WORLD_SIZE``,
    ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``). Backend: ``backend``, else nccl when CUDA is
    available (the process uses GPU ``LOCAL_RANK``), else gloo on CPU. Joining twice is a no-op."""
    if missing := [name for name in TORCHRUN_VARS if name not in os.environ]:
        raise RuntimeError(f"environment variables {missing} are not set: launch with "
                           "`torchrun --nproc_per_node N script.py` (or set them as torchrun does)")
    rank, world_size, local_rank = (int(os.environ[k]) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        backend = backend or ("nccl" if device.type == "cuda" else "gloo")
        dist.init_process_group(backend, rank=rank, world_size=world_size)
    return DistEnv(rank, world_size, local_rank, device)


def cleanup_distributed() -> None:
    """Leave the process group (if joined), once every rank has got here: a rank that tears gloo down
    while a peer is still in a collective or saving can abort the whole job."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def world() -> tuple[int, int]:
    """``(rank, world size)``; ``(0, 1)`` outside a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def shard_model(model: nn.Module, trainer: str = "fast", *, reshard_after_forward: bool = True) -> nn.Module:
    """Shard a causal LM (possibly peft-wrapped) with FSDP2: each decoder layer, then the root.

    Args:
        model: on this process's device. trainer: "fast" or "plain", the ``TrainConfig.trainer`` it will
            train with. reshard_after_forward: free each layer's gathered weights after its forward
            (less memory, one more all-gather in backward).

    Returns:
        The module to give ``train_sft`` / ``train_dpo``: a :class:`PackedLogps` around ``model`` for
        "fast", ``model`` itself for "plain". Gradients are summed across processes (module docstring).
    """
    from torch.distributed.fsdp import FSDPModule, fully_shard

    if trainer not in ("fast", "plain"):
        raise ValueError(f"trainer must be 'fast' or 'plain', got {trainer!r}")
    layers = getattr(causal_lm(model).get_decoder(), "layers", None)
    if not isinstance(layers, nn.ModuleList) or not len(layers):
        raise ValueError(f"{type(causal_lm(model)).__name__}'s decoder has no `layers` ModuleList to shard")
    for layer in layers:
        fully_shard(layer, reshard_after_forward=reshard_after_forward)
    root = PackedLogps(model) if trainer == "fast" else model
    fully_shard(root, reshard_after_forward=reshard_after_forward)
    for module in root.modules():
        if isinstance(module, FSDPModule):
            # Sum, not average (losses are normalised by the global batch already). Forcing plain SUM
            # reductions also makes gloo work: it has neither AVG nor PREMUL_SUM.
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)
    return root


def is_sharded(model: nn.Module) -> bool:
    if not dist.is_available():
        return False
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(m, FSDPModule) for m in model.modules())


def rank_share(chunks: list[list[int]], rank: int, world_size: int) -> list[tuple[list[int], bool]]:
    """This process's micro-batches of one global batch, as ``(items, live)``: micro-batches ``rank``,
    ``rank + world_size``, ... (live), then repeats of the first one (not live: run with weight 0) until
    every process has the same count, since each FSDP forward and backward is a collective."""
    mine = chunks[rank::world_size]
    count = -(-len(chunks) // world_size)
    return [(c, True) for c in mine] + [(chunks[0], False)] * (count - len(mine))


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """Element-wise sum of ``values`` over all processes (float64); identity outside a process group."""
    if world()[1] == 1:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The full (unsharded) state dict of a sharded model on rank 0, on CPU; ``{}`` on other ranks. A
    collective: every process must call it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
