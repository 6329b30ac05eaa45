"""`fasteto branch`: a new run folder that reuses a finished run's first phases and changes later options.

Trying another DPO learning rate on the same SFT model, explorations and pairs should not cost the
experts, SFT and evaluations again. ``branch(src, dst, keep_through="pairs-1", changes={"dpo.lr":
[5e-6]})`` copies ``src``'s files for the phases up to and including ``keep_through``, drops the later
phases' records, checkpoints, models and evaluations, writes the changed config (``run_dir`` = ``dst``)
and a ``branch.json`` saying where it came from. Rerunning ``python -m fasteto.train --run_dir dst``
with the changed options then resumes after ``keep_through``.

The options a kept phase depends on must not change: a branch refuses a change to ``model``,
``envs`` or ``seed`` once experts are kept, to ``sft`` when SFT is kept, to ``explore`` when an
exploration is kept (nor ``mode`` to or from self-play, which explores by sampling), and to ``mode``
when pairs are kept, because those phases' files would not be what the new config makes. An RFT branch
of an ETO run keeps through ``explore-1`` and sets ``mode`` to ``rft``.
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path
from typing import Any

from fasteto.config import RunConfig, to_dict
from fasteto.report import read_metrics
from fasteto.utils.io import atomic_write_json, atomic_write_text

# Option groups each phase reads; a kept phase's groups may not change.
PHASE_OPTIONS = {"experts": ("model", "envs", "seed"), "eval": ("model", "envs", "explore"),
                 "sft": ("sft",), "explore": ("explore",), "pairs": ("mode",), "dpo": ("dpo",)}


class BranchError(ValueError):
    """A branch that cannot be made; the message names the folder, phase or option and the fix."""


def _kind(phase: str) -> str:
    """`"explore-1"` -> `"explore"`, `"eval-sft"` -> `"eval"`, `"sft"` -> `"sft"`."""
    return phase.split("-", 1)[0]


def _set(config: dict, dotted: str, value: Any, defaults: dict) -> None:
    """Set ``dotted`` in ``config``; an option the run's config.json lacks may be set when this version
    of fasteto has it (``defaults``: the current config's), as one added since the run was made."""
    *parents, leaf = dotted.split(".")
    node, known = config, defaults
    for key in parents:
        if not isinstance(node.get(key), dict):
            raise BranchError(f"option {dotted!r}: {key!r} is not an option group of this run's config")
        node, known = node[key], known.get(key) if isinstance(known, dict) else None
    if leaf not in node and not (isinstance(known, dict) and leaf in known):
        raise BranchError(f"option {dotted!r}: no such option in this run's config.json, nor in this "
                          "version of fasteto")
    node[leaf] = value


def _check_changes(kept: list[str], changes: dict[str, Any], config: dict) -> None:
    frozen = {group: phase for phase in kept for group in PHASE_OPTIONS.get(_kind(phase), ())}
    explored = [p for p in kept if _kind(p) == "explore"]
    if "mode" in changes and explored and "self-play" in (changes["mode"], config.get("mode")):
        frozen.setdefault("mode", explored[0])  # self-play explores by sampling, ETO and RFT greedily
    for dotted in changes:
        group = dotted.split(".", 1)[0]
        if group in frozen:
            raise BranchError(f"option {dotted!r} changes what the kept phase {frozen[group]!r} made; keep "
                              "fewer phases (--keep-through an earlier one)")


def _moved(value: Any, old: str, new: str) -> Any:
    """``value`` (a phase's state: paths, or lists and dicts holding them) with paths under ``old``
    rewritten under ``new``; everything else as it is."""
    if isinstance(value, str) and Path(value).is_relative_to(old):
        return str(Path(new) / Path(value).relative_to(old))
    if isinstance(value, list):
        return [_moved(v, old, new) for v in value]
    if isinstance(value, dict):
        return {k: _moved(v, old, new) for k, v in value.items()}
    return value


def _dropped_paths(dst: Path, dropped: list[str]) -> list[Path]:
    """Files and folders of the dropped phases, by the run folder's layout (see fasteto/phases.py)."""
    paths = []
    for phase in dropped:
        kind, _, rest = phase.partition("-")
        if kind == "eval":
            paths.append(dst / "eval" / rest)
        elif kind in ("sft", "dpo", "rft"):
            paths += [dst / "models" / phase, dst / "checkpoints" / phase]
        if kind == "dpo":
            paths.append(dst / f"iter-{rest}" / "reference_logps.json")
        elif kind == "pairs":
            paths += sorted((dst / f"iter-{rest}").glob("pairs_*.json"))
        elif kind == "explore":
            paths.append(dst / f"iter-{rest}")
    return paths


def branch(src: str | Path, dst: str | Path, keep_through: str, changes: dict[str, Any]) -> list[str]:
    """Make ``dst`` from ``src`` as the module docstring says; returns the kept phases in order."""
    src, dst = Path(src), Path(dst)
    try:
        state = json.loads((src / "state.json").read_text())
        config = json.loads((src / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise BranchError(f"{src}: not a readable run folder ({err}); give the --run_dir of a run") from err
    done = list(state.get("done", {}))
    if keep_through not in done:
        raise BranchError(f"{src} has not finished phase {keep_through!r}; finished: {', '.join(done)}")
    if dst.exists():
        raise BranchError(f"{dst} exists; give a new folder for the branch")
    kept, dropped = done[:done.index(keep_through) + 1], done[done.index(keep_through) + 1:]
    _check_changes(kept, changes, config)
    new_config = copy.deepcopy(config)
    defaults = to_dict(RunConfig())
    for dotted, value in changes.items():
        _set(new_config, dotted, value, defaults)
    new_config["run_dir"] = str(dst)

    tmp = dst.with_name(dst.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp, ignore=shutil.ignore_patterns("summary.json", "curves.png"))
    for path in _dropped_paths(tmp, dropped):
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
    # The run wrote its paths under its config's run_dir; the branch's point into the branch.
    done_kept = {k: _moved(state["done"][k], str(config["run_dir"]), str(dst)) for k in kept}
    atomic_write_json(tmp / "state.json", {**state, "done": done_kept})
    records = [r for r in read_metrics(tmp / "metrics.jsonl") if r.get("phase") not in dropped]
    atomic_write_text(tmp / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in records))
    atomic_write_json(tmp / "config.json", new_config)
    atomic_write_json(tmp / "branch.json", {"from": str(src), "kept": kept, "dropped": dropped,
                                            "changes": changes})
    tmp.rename(dst)
    return kept
