"""FSDP2 data parallelism on CPU (gloo): two processes train exactly what one process trains.

The processes are started with ``torch.multiprocessing`` and join the group through the environment
variables torchrun would set, so ``setup_distributed`` is exercised as under ``torchrun``.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from tiny import tiny_llama

from fasteto.data.tokenized import TokenizedPair
from fasteto.packing import plan_micro_batches
from fasteto.trainer import TrainConfig, reference_logps, train_dpo
from fasteto.trainer.distributed import (
    cleanup_distributed,
    full_state_dict,
    rank_share,
    setup_distributed,
    shard_model,
    world,
)

WORLD = 2
BUDGET = 34  # packed tokens per micro-batch: the 5 pairs below make 3 micro-batches, an odd count
F, T = False, True


def make_pairs() -> list[TokenizedPair]:
    """Five pairs sharing a 6-token instruction, each chosen and rejected sharing a first token."""
    g = torch.Generator().manual_seed(0)
    instruction = torch.randint(1, 64, (6,), generator=g).tolist()
    out = []
    for i in range(5):
        prompt = instruction + torch.randint(1, 64, (2 + i % 2,), generator=g).tolist()
        first = torch.randint(1, 64, (1,), generator=g).tolist()
        chosen = first + torch.randint(1, 64, (4 + i % 3,), generator=g).tolist()
        rejected = first + torch.randint(1, 64, (3 + i % 2,), generator=g).tolist()
        c_mask = [T] * len(chosen)
        c_mask[2] = F  # an observation token inside the continuation
        out.append(TokenizedPair(f"pair{i}", prompt, chosen, c_mask, rejected, [T] * len(rejected)))
    return out


def config(trainer: str) -> TrainConfig:
    # 5 pairs, one global batch per step, 2 epochs: 2 steps (the second uses the first's AdamW state)
    return TrainConfig(lr=1e-3, epochs=2, global_batch=5, micro_batch=1, schedule="constant",
                       warmup_ratio=0.0, trainer=trainer, token_budget=BUDGET,
                       attn_impl="varlen_eager")  # fmt: skip


def train_one_process(trainer: str, pairs, ref) -> dict:
    model = tiny_llama()
    history = train_dpo(model, pairs, ref, config(trainer))
    return {"history": history, "weights": {k: v.detach() for k, v in model.state_dict().items()},
            "grads": {k: p.grad for k, p in model.named_parameters()}}


def _worker(rank: int, port: int, pairs, ref, out_dir: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))  # fmt: skip
    torch.set_num_threads(1)
    env = setup_distributed()
    assert (env.rank, env.world_size, env.device.type) == (rank, WORLD, "cpu") and world() == (rank, WORLD)
    try:
        for trainer in ("fast", "plain"):
            root = shard_model(tiny_llama(), trainer)
            history = train_dpo(root, pairs, ref, config(trainer))
            prefix = "model." if trainer == "fast" else ""  # the fast trainer's root wraps the model
            grads = {k.removeprefix(prefix): p.grad.full_tensor() for k, p in root.named_parameters()}
            weights = {k.removeprefix(prefix): v for k, v in full_state_dict(root).items()}
            if rank == 0:
                result = {"history": history, "weights": weights, "grads": grads}
                torch.save(result, Path(out_dir) / f"{trainer}.pt")
    finally:
        cleanup_distributed()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_rank_share_pads_with_dead_repeats() -> None:
    chunks = [[0, 1], [2], [3, 4], [5]]
    assert rank_share(chunks, 0, 3) == [([0, 1], True), ([5], True)]
    assert rank_share(chunks, 2, 3) == [([3, 4], True), ([0, 1], False)]
    assert rank_share(chunks, 1, 3) == [([2], True), ([0, 1], False)]
    assert rank_share(chunks, 0, 1) == [(c, True) for c in chunks]


def test_setup_without_torchrun_names_the_launcher(monkeypatch) -> None:
    monkeypatch.delenv("MASTER_PORT", raising=False)
    with pytest.raises(RuntimeError, match="torchrun --nproc_per_node"):
        setup_distributed()


def test_two_processes_train_what_one_process_trains(tmp_path) -> None:
    pairs = make_pairs()
    assert len(plan_micro_batches(pairs, BUDGET)) == 3  # rank 1 runs one live micro-batch and one repeat
    ref = reference_logps(tiny_llama(seed=7), pairs, pad_id=0, micro_batch_size=5)
    mp.start_processes(_worker, args=(_free_port(), pairs, ref, str(tmp_path)), nprocs=WORLD, join=True,
                       start_method="spawn")  # fmt: skip
    for trainer in ("fast", "plain"):
        one = train_one_process(trainer, pairs, ref)
        two = torch.load(tmp_path / f"{trainer}.pt", weights_only=False)
        for a, b in zip(one["history"], two["history"], strict=True):
            assert b["loss"] == pytest.approx(a["loss"], rel=1e-6), trainer
            assert b["rewards/margin"] == pytest.approx(a["rewards/margin"], rel=1e-5, abs=1e-7)
            assert b["tokens"] == a["tokens"] and b["tokens_plain"] == a["tokens_plain"]
            assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-5)
        for name, grad in one["grads"].items():  # the second step's summed gradient
            torch.testing.assert_close(two["grads"][name], grad, rtol=1e-5, atol=1e-7, msg=name)
        for name, value in one["weights"].items():
            # AdamW's ≈ lr·g/(|g| + 1e-8) step: rounding-level gradient differences where |g| is tiny
            torch.testing.assert_close(two["weights"][name], value, rtol=0, atol=1e-5, msg=name)
