"""SFT learning-rate sweep for a small model: held-out loss on expert trajectories after a short SFT.

    python scripts/sft_lr_sweep.py experts.json --lrs 2e-5 1e-4 3e-4 --train 48 --held-out 24 \
        -o results/sft_lr_sweep.jsonl

Every learning rate starts from the same pretrained weights and sees the same trajectories in the same
order (fasteto's SFT stage: cosine schedule, warmup 3%). The score is the mean negative log-likelihood
per model token on held-out expert trajectories (other tasks of the same file, after a seeded
shuffle), and the fraction of those
tokens the model predicts greedily (teacher forcing). It answers "which LR learns the expert's turns
fastest without breaking the model" for a given budget of steps; it is not a success rate.
One JSON line per learning rate is appended to ``-o`` with the device, versions and git SHA.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import subprocess
import time
from pathlib import Path

import torch

from fasteto.data.formats import read_trajectories
from fasteto.data.tokenize import tokenize_trajectories
from fasteto.models.load import load_model, load_tokenizer, resolve_model
from fasteto.trainer import TrainConfig, train_sft


def cpu_name() -> str:
    """The CPU's model name (Linux), else the machine type."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.machine()


def held_out_scores(model: torch.nn.Module, seqs) -> tuple[float, float]:
    """(mean NLL per model token, greedy agreement) over ``seqs`` under teacher forcing."""
    nll, hits, count = 0.0, 0, 0
    model.eval()
    with torch.no_grad():
        for seq in seqs:
            ids = torch.tensor([seq.input_ids])
            logits = model(ids).logits[0, :-1].float()
            mask = torch.tensor(seq.loss_mask[1:])
            targets = ids[0, 1:][mask]
            picked = logits[mask]
            nll += torch.nn.functional.cross_entropy(picked, targets, reduction="sum").item()
            hits += int((picked.argmax(-1) == targets).sum())
            count += int(mask.sum())
    return nll / count, hits / count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("experts", help="an ETO SFT file (fasteto expert's output)")
    parser.add_argument("--lrs", type=float, nargs="+", default=[2e-5, 1e-4, 3e-4])
    parser.add_argument("--train", type=int, default=48, help="training trajectories (shuffled, seed 0)")
    parser.add_argument("--held-out", type=int, default=24, help="held-out trajectories (its last)")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--global-batch", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=2048)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("-o", "--out", required=True)
    args = parser.parse_args()

    trajectories = read_trajectories(args.experts, "sft")
    random.Random(0).shuffle(trajectories)  # files list tasks by type; mix the types into both sets
    if len(trajectories) < args.train + args.held_out:
        raise SystemExit(f"{args.experts} has {len(trajectories)} trajectories, fewer than --train "
                         f"{args.train} + --held-out {args.held_out}; lower them")
    path = resolve_model(args.model)
    tokenizer = load_tokenizer(path)
    train, _ = tokenize_trajectories(tokenizer, trajectories[: args.train], args.max_length)
    held, _ = tokenize_trajectories(tokenizer, trajectories[-args.held_out:], args.max_length)
    sha = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    common = {"experts": args.experts, "train": len(train), "held_out": len(held), "epochs": args.epochs,
              "global_batch": args.global_batch, "model": args.model, "git_sha": sha,
              "device": f"{cpu_name()} ({torch.get_num_threads()} torch threads)",
              "versions": {"torch": torch.__version__, "python": platform.python_version()}}
    base = held_out_scores(load_model(path), held)
    rows = [{**common, "lr": 0.0, "held_out_nll": base[0], "held_out_greedy_agreement": base[1],
             "seconds": 0.0}]
    for lr in args.lrs:
        model = load_model(path).train()
        cfg = TrainConfig.sft(lr=lr, epochs=args.epochs, global_batch=args.global_batch,
                              pad_id=tokenizer.pad_token_id or 0)
        start = time.time()
        train_sft(model, train, cfg)
        nll, agreement = held_out_scores(model, held)
        rows.append({**common, "lr": lr, "held_out_nll": nll, "held_out_greedy_agreement": agreement,
                     "seconds": time.time() - start})
        print(json.dumps(rows[-1]), flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(out.suffix + ".tmp")
    previous = out.read_text() if out.exists() else ""
    tmp.write_text(previous + "".join(json.dumps(r) + "\n" for r in rows))
    tmp.replace(out)


if __name__ == "__main__":
    main()
