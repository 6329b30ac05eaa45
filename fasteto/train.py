"""`python -m fasteto.train`: the ETO loop (Song et al., ACL 2024), as the paper states it.

    experts  ← the environments' own solvers on the training tasks
    policy   ← SFT(base, experts)                          (behavioural cloning)
    evaluate base and policy on the test splits
    for k = 1 .. iterations:
        explored ← policy plays every training task         (exploration)
        pairs    ← failed explored vs expert, per task        (ETO's pair rule)
        policy   ← DPO(policy, pairs; reference = policy)    (trajectory optimisation)
        evaluate policy

Modes: ``eto``; ``self-play`` (no expert: the base model explores several samples per task and its best
trajectory is paired with its worst); ``rft`` (fine-tune on experts plus successful explorations instead
of DPO). Every phase writes its files into the run folder and is then marked done, so rerunning the same
command resumes after the last finished phase (and the last finished episode of a cut exploration).
"""

from __future__ import annotations

import argparse
import random
import sys
import time

from fasteto.config import (
    PRESETS,
    ConfigError,
    RunConfig,
    add_arguments,
    load_yaml,
    overrides,
    to_dict,
    update,
)
from fasteto.run import RunFolder, RunFolderError
from fasteto.utils.choices import print_choices


def parse_config(argv: list[str] | None) -> RunConfig:
    """Preset, then a YAML file, then command-line flags, each over the last."""
    parser = argparse.ArgumentParser(
        prog="python -m fasteto.train",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        default="default",
        help="starting values: 'default' (small, for a CPU) or 'paper' (GPU nodes)",
    )
    parser.add_argument("--config", help="a YAML file of options, applied over the preset")
    add_arguments(parser, RunConfig)
    args = parser.parse_args(argv)
    try:
        cfg = update(RunConfig(), PRESETS[args.preset])
        if args.config:
            cfg = update(cfg, load_yaml(args.config))
        cfg = update(cfg, overrides(args, RunConfig))
    except ConfigError as exc:
        parser.error(str(exc))
    return cfg


def sample(ids: list[str], n: int | None, seed: int) -> list[str]:
    """``n`` task ids drawn with ``seed``, in split order (all of them when n is None or too big)."""
    if n is None or n >= len(ids):
        return list(ids)
    keep = set(random.Random(seed).sample(ids, n))
    return [t for t in ids if t in keep]


def main(argv: list[str] | None = None) -> int:
    cfg = parse_config(argv)
    print_choices()  # auto choices (backends, dtypes) as they are made
    from fasteto.envs import EnvSetupError
    from fasteto.phases import EtoLoop

    try:
        loop = EtoLoop(cfg)
        loop.prepare()  # every check that can fail, before the run folder is touched
        run = RunFolder(cfg.run_dir, to_dict(cfg), defaults=to_dict(type(cfg)()))
    except (RunFolderError, EnvSetupError, ValueError) as exc:
        print(f"fasteto.train: error: {exc}", file=sys.stderr)
        return 2
    start = time.time()
    loop.run(run)
    print(f"\nrun folder: {run.path} ({time.time() - start:.0f} s this time)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
