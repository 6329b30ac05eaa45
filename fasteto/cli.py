"""The `fasteto` command: check the environments, make expert trajectories, build DPO pairs and RFT sets,
compare the results of runs, branch a run folder."""

from __future__ import annotations

import argparse
import json
import sys

from fasteto.envs.base import EnvSetupError


def _expert(args: argparse.Namespace) -> int:
    from fasteto.data.formats import write_trajectories
    from fasteto.rollout.expert import make_experts

    kwargs = _env_kwargs(args)
    report = make_experts(args.env, args.split, limit=args.limit, workers=args.workers,
                          cache_dir=args.cache_dir, env_kwargs=kwargs)
    from fasteto.rollout.seen import check_seen

    write_trajectories(args.output, report.trajectories, "sft")
    print(report.summary())
    print(check_seen(report.trajectories).summary())
    print(f"wrote {len(report.trajectories)} expert trajectories to {args.output}")
    return 0


def _pairs(args: argparse.Namespace) -> int:
    from fasteto.data.formats import read_trajectories, write_pairs
    from fasteto.data.pairs import DEFAULT_MAX_EXTRA_MESSAGES, build_pairs, build_self_play_pairs

    explored = read_trajectories(args.explored, "explored")
    if args.expert is None:
        pairs, stats = build_self_play_pairs(explored)
    else:
        experts = read_trajectories(args.expert, "sft")
        cut = args.max_extra_messages
        if cut == "auto":  # ETO's default for the environment; ALFWorld records carry a game file
            env = args.env or ("alfworld" if any("game_file" in t.extra for t in experts) else "sciworld")
            cut = DEFAULT_MAX_EXTRA_MESSAGES[env]
            print(f"cut: {env} default, {'none' if cut is None else f'expert length + {cut} messages'}")
        pairs, stats = build_pairs(experts, explored, cut)
    write_pairs(args.output, pairs)
    print(stats.summary())
    print(f"wrote {len(pairs)} pairs to {args.output}")
    return 0


def _rft(args: argparse.Namespace) -> int:
    from fasteto.data.formats import read_trajectories, write_trajectories
    from fasteto.data.pairs import build_rft_set

    experts = read_trajectories(args.expert, "sft")
    explored = read_trajectories(args.explored, "explored")
    items = build_rft_set(experts, explored, success_threshold=args.threshold)
    write_trajectories(args.output, items, "sft")
    print(f"wrote {len(items)} trajectories to {args.output}: {len(experts)} expert + "
          f"{len(items) - len(experts)} explored with reward >= {args.threshold}")
    return 0


def _check(args: argparse.Namespace) -> int:
    from fasteto.check import run_check

    return run_check(args.env, alfworld_data=args.alfworld_data, tasks=args.tasks)


def _compare(args: argparse.Namespace) -> int:
    from fasteto.compare import compare
    from fasteto.utils.io import atomic_write_text

    text = compare(args.runs, args.rows)
    print(text)
    if args.output:
        atomic_write_text(args.output, text + "\n")
    return 0


def _branch(args: argparse.Namespace) -> int:
    from fasteto.branch import branch

    changes = {}
    for item in args.set or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--set {item!r}: write OPTION=VALUE, e.g. dpo.lr=[5e-6]")
        try:
            changes[key] = json.loads(value)
        except json.JSONDecodeError:
            changes[key] = value  # a bare string, e.g. mode=rft
    kept = branch(args.src, args.dst, args.keep_through, changes)
    flags = " ".join(f"--{k} {','.join(map(str, v)) if isinstance(v, list) else v}"
                     for k, v in changes.items())
    print(f"{args.dst}: phases {', '.join(kept)} kept from {args.src}; resume it with "
          f"`python -m fasteto.train --run_dir {args.dst} <{args.src}'s options> {flags}`")
    return 0


def _env_kwargs(args: argparse.Namespace) -> dict:
    if args.env == "alfworld":
        return {"data": args.alfworld_data, "expert": args.alfworld_expert}
    return {}


def _max_extra(value: str):
    from fasteto.data.pairs import parse_max_extra

    if value == "auto":
        return value
    try:
        return parse_max_extra(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fasteto", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    check = sub.add_parser("check", help="play expert episodes in each environment and time them")
    check.add_argument("--env", choices=["sciworld", "alfworld"], action="append",
                       help="environment to check (repeatable); default: ScienceWorld, and ALFWorld when "
                            "its data is found")
    check.add_argument("--tasks", type=int, default=3, help="tasks per environment (default 3)")
    check.add_argument("--alfworld-data", help="ALFWorld data folder (default: $ALFWORLD_DATA)")
    check.set_defaults(func=_check)

    expert = sub.add_parser("expert", help="make an ETO SFT file of expert trajectories")
    expert.add_argument("--env", required=True, choices=["sciworld", "alfworld"])
    expert.add_argument("--split", default="train", help="train | seen | unseen (ETO's names also work)")
    expert.add_argument("--limit", type=int, help="only the first N tasks of the split")
    expert.add_argument("--workers", type=int, help="worker processes (default: one per core)")
    expert.add_argument("--cache-dir", help="per-task cache (default: $FASTETO_CACHE or ~/.cache/fasteto)")
    expert.add_argument("--alfworld-data", help="ALFWorld data folder (default: $ALFWORLD_DATA)")
    expert.add_argument("--alfworld-expert", default="auto",
                        choices=["auto", "gt_traj", "handcoded", "planner"],
                        help="ALFWorld's expert: gt_traj (the searching trajectories shipped beside the "
                             "train games), handcoded (ALFWorld's searching expert), planner (PDDL; knows "
                             "where everything is), or auto (default): gt_traj, then handcoded where "
                             "gt_traj does not win")
    expert.add_argument("-o", "--output", required=True, help="the SFT file to write (JSON)")
    expert.set_defaults(func=_expert)

    pairs = sub.add_parser("pairs", help="build ETO's DPO pairs from expert and explored trajectories")
    pairs.add_argument("expert", nargs="?", help="the expert SFT file; omit with --self-play")
    pairs.add_argument("explored", help="the explored-trajectory file")
    pairs.add_argument("-o", "--output", required=True, help="the DPO file to write (JSON)")
    pairs.add_argument("--max-extra-messages", type=_max_extra, default="auto",
                       help="cut a losing explored trajectory to the expert's length + N messages, or "
                            "'none'; default 'auto': ETO's per environment (10 for ScienceWorld and "
                            "WebShop, none for ALFWorld)")
    pairs.add_argument("--env", choices=["sciworld", "alfworld", "webshop"],
                       help="environment of the files, for the default cut (default: inferred)")
    pairs.add_argument("--self-play", action="store_true",
                       help="no expert: pair each task's best explored trajectory with its worst")
    pairs.set_defaults(func=_pairs)

    rft = sub.add_parser("rft", help="the RFT set: expert plus successful explored trajectories (SFT file)")
    rft.add_argument("expert", help="the expert SFT file")
    rft.add_argument("explored", help="the explored-trajectory file")
    rft.add_argument("-o", "--output", required=True, help="the SFT file to write (JSON)")
    rft.add_argument("--threshold", type=float, default=1.0, help="success: reward >= this (default 1.0)")
    rft.set_defaults(func=_rft)

    compare = sub.add_parser("compare", help="compare run folders: every row with its 95%% interval, and "
                                              "paired differences on shared tasks (Markdown)")
    compare.add_argument("runs", nargs="+", metavar="RUN", help="run folders (each with its summary.json); "
                         "by default each later run is compared with the first, method by method")
    compare.add_argument("--rows", nargs="+", metavar="RUN:LABEL",
                         help='compare these rows instead, each later one minus the first; after the run '
                              'folders, e.g. runs/a runs/b --rows "runs/a:SFT" "runs/b:ETO iteration 1" '
                              '(RUN: a folder as given, or its last name)')
    compare.add_argument("-o", "--output", help="also write the Markdown to this file")
    compare.set_defaults(func=_compare)

    fork = sub.add_parser("branch", help="a new run folder reusing a run's first phases, with later options "
                                         "changed (e.g. another DPO LR on the same SFT model and pairs)")
    fork.add_argument("src", help="the finished (or partly finished) run folder")
    fork.add_argument("dst", help="the new run folder (must not exist)")
    fork.add_argument("--keep-through", required=True, metavar="PHASE",
                      help="the last phase to keep, e.g. pairs-1 (see the source's state.json)")
    fork.add_argument("--set", action="append", metavar="OPTION=VALUE",
                      help="a changed option, VALUE as JSON where it parses: dpo.lr=[5e-6], mode=rft")
    fork.set_defaults(func=_branch)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "pairs":
        if args.self_play and args.expert is not None:
            parser.error("pairs: give either an expert file or --self-play, not both")
        if not args.self_play and args.expert is None:
            parser.error("pairs: give the expert file and the explored file (or --self-play)")
    try:
        return args.func(args)
    except (EnvSetupError, ValueError, FileNotFoundError) as exc:
        print(f"fasteto {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
