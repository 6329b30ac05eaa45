"""RunFolder: a different config is refused; an option added since the folder was made is not a
difference while it stays at its default; versions() records the source commit and whether it was edited."""

from __future__ import annotations

import json

import pytest

from fasteto.config import RunConfig, to_dict
from fasteto.run import RunFolder, RunFolderError

DEFAULTS = {"seed": 0, "dpo": {"lr": [1.0], "sft_weight": 0.0}}
OLD = {"seed": 0, "dpo": {"lr": [1.0]}}  # written before dpo.sft_weight existed


def test_an_option_added_since_resumes_at_its_default_only(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(OLD))
    RunFolder(tmp_path, {"seed": 0, "dpo": {"lr": [1.0], "sft_weight": 0.0}}, defaults=DEFAULTS)
    with pytest.raises(RunFolderError, match=r"dpo.sft_weight is None there, 0.5 here"):
        RunFolder(tmp_path, {"seed": 0, "dpo": {"lr": [1.0], "sft_weight": 0.5}}, defaults=DEFAULTS)
    with pytest.raises(RunFolderError, match=r"dpo.lr is \[1.0\] there, \[2.0\] here"):
        RunFolder(tmp_path, {"seed": 0, "dpo": {"lr": [2.0], "sft_weight": 0.0}}, defaults=DEFAULTS)
    with pytest.raises(RunFolderError, match=r"dpo.sft_weight is None there, 0.0 here"):
        RunFolder(tmp_path, {"seed": 0, "dpo": {"lr": [1.0], "sft_weight": 0.0}})  # no defaults: strict
    assert json.loads((tmp_path / "config.json").read_text()) == OLD  # never rewritten


def test_an_option_the_folder_has_and_the_config_lost_is_a_difference(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({**OLD, "gone": 1}))
    with pytest.raises(RunFolderError, match=r"gone is 1 there, None here"):
        RunFolder(tmp_path, OLD, defaults=DEFAULTS)


def test_the_real_config_resumes_itself(tmp_path):
    config = to_dict(RunConfig())
    RunFolder(tmp_path, config, defaults=config)
    RunFolder(tmp_path, config, defaults=config)


def test_versions_record_whether_tracked_files_were_edited(monkeypatch):
    import fasteto.run as run

    answers = {("rev-parse", "HEAD"): "a" * 40, ("status", "--porcelain", "--untracked-files=no"): " M x.py"}
    monkeypatch.setattr(run, "_git", lambda *args: answers[args])
    assert (run.versions()["git_sha"], run.versions()["git_dirty"]) == ("a" * 40, True)
    answers[("status", "--porcelain", "--untracked-files=no")] = ""
    assert run.versions()["git_dirty"] is False
    monkeypatch.setattr(run, "_git", lambda *args: None)  # no git, or not a checkout
    assert run.versions()["git_sha"] == "unknown" and "git_dirty" not in run.versions()
