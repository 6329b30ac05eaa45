"""What the agent did, per evaluation of a run folder: the verbs it used and how often it repeated itself.

    python scripts/action_stats.py runs/small [runs/small-rpo ...]

For each run, environment and evaluation (``eval/<name>/<env>.jsonl``), one line: episodes, mean
actions per episode, actions equal to the one just before (a loop), `focus` actions (ScienceWorld's
irreversible choice) and the eight most used verbs. Pairs (``iter-K/pairs_<env>.json``) get the same
line for their chosen and rejected sides. A reading aid for the closing notes of a run, not a metric
the trainer uses.
"""

from __future__ import annotations

import argparse
import collections
import json
from pathlib import Path

from fasteto.data.types import GPT, INSTRUCTION_LEN
from fasteto.envs.base import parse_action


def actions(messages: list[dict], skip: int = INSTRUCTION_LEN) -> list[str]:
    """The actions of the model's turns after the first ``skip`` messages (the instruction exchange), read
    as the environments read them; ``<no action>`` where a reply has none."""
    return [parse_action(m.get("value", "")) or "<no action>"
            for m in messages[skip:] if m.get("from") == GPT]


def line(name: str, episodes: list[list[str]]) -> str:
    verbs = collections.Counter(a if a.startswith("<") else a.split(" ")[0]
                                for acts in episodes for a in acts)
    repeats = sum(acts[i] == acts[i - 1] for acts in episodes for i in range(1, len(acts)))
    focus = sum(a.startswith("focus") for acts in episodes for a in acts)
    mean = sum(map(len, episodes)) / max(1, len(episodes))
    return (f"  {name:<22} n={len(episodes):<3} actions/episode {mean:5.1f}  repeats {repeats:<4} "
            f"focus {focus:<3} {dict(verbs.most_common(8))}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", help="run folders")
    args = parser.parse_args()
    for run in map(Path, args.runs):
        if not (run / "eval").is_dir():
            raise SystemExit(f"{run}: no eval/ folder; give the --run_dir of a `python -m fasteto.train` run")
        print(run)
        for path in sorted(run.glob("eval/*/*.jsonl")):
            records = [json.loads(s) for s in path.read_text(encoding="utf-8").splitlines() if s.strip()]
            print(line(f"{path.parent.name}/{path.stem}", [actions(r["conversations"]) for r in records]))
        for path in sorted(run.glob("iter-*/pairs_*.json")):
            pairs = json.loads(path.read_text(encoding="utf-8"))
            for side in ("chosen", "rejected"):
                # a pair's sides hold only what follows its prompt: nothing to skip
                name = f"{path.parent.name}/{path.stem} {side}"
                print(line(name, [actions(p[side], skip=0) for p in pairs]))


if __name__ == "__main__":
    main()
