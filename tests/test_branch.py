"""Tests for fasteto.branch: which files, records and options a branch keeps, exactly, and its refusals."""

from __future__ import annotations

import json

import pytest

from fasteto.branch import BranchError, branch
from fasteto.cli import main

PHASES = ["experts", "eval-base", "sft", "eval-sft", "explore-1", "pairs-1", "dpo-1", "eval-eto-1"]


def _run_folder(root):
    """A run folder laid out as fasteto/phases.py writes one, with one marker file per phase."""
    src = root / "runs" / "a"
    files = ["experts/sciworld.json", "eval/base/sciworld.jsonl", "models/sft/model.safetensors",
             "checkpoints/sft/step-1/x", "eval/sft/sciworld.jsonl", "iter-1/explored_sciworld.json",
             "iter-1/pairs_sciworld.json", "iter-1/reference_logps.json", "models/dpo-1/model.safetensors",
             "checkpoints/dpo-1/step-2/x", "eval/eto-1/sciworld.jsonl", "summary.json", "curves.png"]
    for name in files:
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        (src / name).write_text(name)
    done = {p: f"{src}/x/{p}" for p in PHASES}
    (src / "state.json").write_text(json.dumps({"done": done}))
    config = {"run_dir": str(src), "mode": "eto", "seed": 0, "model": {"name": "m"}, "envs": {"names": []},
              "sft": {"lr": 5e-4}, "explore": {"max_steps": 15}, "dpo": {"lr": [2.5e-5], "beta": [0.1]}}
    (src / "config.json").write_text(json.dumps(config))
    (src / "metrics.jsonl").write_text("".join(json.dumps({"phase": p, "x": 1}) + "\n" for p in PHASES))
    return src, config


def _files(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def test_branch_keeps_through_pairs_and_changes_dpo_lr(tmp_path):
    src, config = _run_folder(tmp_path)
    dst = tmp_path / "runs" / "b"
    assert branch(src, dst, "pairs-1", {"dpo.lr": [5e-6]}) == PHASES[:6]
    assert _files(dst) == sorted([
        "branch.json", "checkpoints/sft/step-1/x", "config.json", "eval/base/sciworld.jsonl",
        "eval/sft/sciworld.jsonl", "experts/sciworld.json", "iter-1/explored_sciworld.json",
        "iter-1/pairs_sciworld.json", "metrics.jsonl", "models/sft/model.safetensors", "state.json"])
    state = json.loads((dst / "state.json").read_text())["done"]
    assert state == {p: f"{dst}/x/{p}" for p in PHASES[:6]}  # paths point into the branch
    assert json.loads((dst / "config.json").read_text()) == {
        **config, "run_dir": str(dst), "dpo": {"lr": [5e-6], "beta": [0.1]}}
    phases = [json.loads(line)["phase"] for line in (dst / "metrics.jsonl").read_text().splitlines()]
    assert phases == PHASES[:6]
    assert json.loads((dst / "branch.json").read_text()) == {
        "from": str(src), "kept": PHASES[:6], "dropped": PHASES[6:], "changes": {"dpo.lr": [5e-6]}}
    assert _files(src)[-1] == "summary.json"  # the source is untouched


def test_branch_may_set_an_option_added_since_the_run_was_made(tmp_path):
    src, config = _run_folder(tmp_path)  # its dpo group predates dpo.sft_weight
    dst = tmp_path / "runs" / "rpo"
    branch(src, dst, "pairs-1", {"dpo.sft_weight": 1.0})
    assert json.loads((dst / "config.json").read_text())["dpo"] == {**config["dpo"], "sft_weight": 1.0}


def test_branch_for_rft_drops_the_pairs_and_keeps_the_explorations(tmp_path):
    src, _ = _run_folder(tmp_path)
    dst = tmp_path / "rft"
    branch(src, dst, "explore-1", {"mode": "rft"})
    assert "iter-1/explored_sciworld.json" in _files(dst) and "iter-1/pairs_sciworld.json" not in _files(dst)
    assert json.loads((dst / "config.json").read_text())["mode"] == "rft"


@pytest.mark.parametrize(("keep", "changes", "message"), [
    ("pairs-1", {"sft.lr": 1e-4}, "changes what the kept phase 'sft' made"),
    ("explore-1", {"explore.max_steps": 20}, "changes what the kept phase"),
    ("explore-1", {"mode": "self-play"}, "changes what the kept phase 'explore-1' made"),
    ("dpo-2", {}, "has not finished phase 'dpo-2'"),
    ("pairs-1", {"dpo.nope": 1}, "no such option in this run's config.json, nor in this version"),
    ("pairs-1", {"nope.lr": 1}, "'nope' is not an option group"),
])
def test_branch_refusals_name_the_phase_or_option(tmp_path, keep, changes, message):
    src, _ = _run_folder(tmp_path)
    with pytest.raises(BranchError, match=message):
        branch(src, tmp_path / "b", keep, changes)
    assert not (tmp_path / "b").exists()


def test_cli_branch_parses_json_values_and_refuses_an_existing_folder(tmp_path, capsys):
    src, _ = _run_folder(tmp_path)
    dst = tmp_path / "b"
    assert main(["branch", str(src), str(dst), "--keep-through", "pairs-1", "--set", "dpo.lr=[5e-6]"]) == 0
    assert json.loads((dst / "config.json").read_text())["dpo"]["lr"] == [5e-6]
    assert "--dpo.lr 5e-06" in capsys.readouterr().out
    assert main(["branch", str(src), str(dst), "--keep-through", "pairs-1"]) == 2
    assert "exists; give a new folder" in capsys.readouterr().err
