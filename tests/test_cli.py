"""The `fasteto` command as a user meets it: pairs, check, and clear errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from fasteto.cli import main


def _traj(tid, reward, n_turns, **extra):
    conv = [{"from": "human", "value": "inst"}, {"from": "gpt", "value": "OK"},
            {"from": "human", "value": f"task {tid}"}]
    for i in range(n_turns):
        conv += [{"from": "gpt", "value": f"Thought: t\nAction: a{i}"}, {"from": "human", "value": f"o{i}"}]
    record = {"id": tid, **extra, "conversations": conv[:-1]}
    if reward != "absent":
        record["reward"] = reward
    return record


def test_pairs_command_counts_and_writes(tmp_path, capsys):
    expert = tmp_path / "expert.json"
    explored = tmp_path / "explored.jsonl"
    expert.write_text(json.dumps([_traj("a", "absent", 2), _traj("b", "absent", 2), _traj("c", "absent", 1)]))
    explored.write_text("\n".join(json.dumps(r) for r in [
        _traj("a", 0.0, 30), _traj("b", 1.0, 3), _traj("c", None, 1), _traj("zz", 0.0, 1)]))
    out = tmp_path / "pairs.json"
    assert main(["pairs", str(expert), str(explored), "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "cut: sciworld default, expert length + 10 messages" in printed
    assert "win 0 / tie 1 / lose 1" in printed and "wrote 1 pairs" in printed
    [pair] = json.loads(out.read_text())
    assert pair["id"] == "a" and len(pair["rejected"]) == 2 * 2 + 10 - 1  # cut at expert length + 10


def test_pairs_command_no_cut_for_alfworld_files(tmp_path, capsys):
    expert = tmp_path / "expert.json"
    explored = tmp_path / "explored.json"
    expert.write_text(json.dumps([_traj("g", "absent", 1, game_file="json_2.1.1/train/g/game.tw-pddl")]))
    explored.write_text(json.dumps([_traj("g", 0.0, 30)]))
    assert main(["pairs", str(expert), str(explored), "-o", str(tmp_path / "p.json")]) == 0
    assert "cut: alfworld default, none" in capsys.readouterr().out
    [pair] = json.loads((tmp_path / "p.json").read_text())
    assert len(pair["rejected"]) == 2 * 30 - 1


def test_rft_command_keeps_experts_and_successes(tmp_path, capsys):
    expert = tmp_path / "expert.json"
    explored = tmp_path / "explored.json"
    expert.write_text(json.dumps([_traj("a", "absent", 1)]))
    explored.write_text(json.dumps([_traj("a", 1.0, 2), _traj("a", 0.5, 2), _traj("b", None, 1)]))
    assert main(["rft", str(expert), str(explored), "-o", str(tmp_path / "rft.json")]) == 0
    assert "1 expert + 1 explored with reward >= 1.0" in capsys.readouterr().out
    items = json.loads((tmp_path / "rft.json").read_text())
    assert [(i["id"], len(i["conversations"])) for i in items] == [("a", 4), ("a", 6)]


def test_malformed_file_gets_an_error_naming_it(tmp_path, capsys):
    bad = tmp_path / "explored.json"
    bad.write_text(json.dumps([{"id": "x", "conversations": [{"from": "gpt", "value": "hi"}], "reward": 1}]))
    expert = tmp_path / "expert.json"
    expert.write_text(json.dumps([_traj("x", "absent", 1)]))
    assert main(["pairs", str(expert), str(bad), "-o", str(tmp_path / "out.json")]) == 2
    err = capsys.readouterr().err
    assert "explored.json" in err and "item 0" in err and "'x'" in err
    assert not (tmp_path / "out.json").exists()


def test_bad_options_are_refused(tmp_path):
    with pytest.raises(SystemExit) as exc:
        main(["pairs", "a.json", "b.json", "-o", "o.json", "--max-extra-messages", "-3"])
    assert exc.value.code == 2
    with pytest.raises(SystemExit):
        main(["expert", "--env", "webshop", "-o", "x.json"])


def test_alfworld_asked_for_without_data_says_what_to_do(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "fasteto", "expert", "--env", "alfworld", "--alfworld-data",
                           str(tmp_path / "missing"), "-o", str(tmp_path / "x.json")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert "ALFWorld's game files were not found" in proc.stderr and "alfworld-download" in proc.stderr


@pytest.mark.slow
def test_check_runs_sciworld_alone_when_alfworld_is_absent(tmp_path, sciworld_env):
    env = {"PATH": __import__("os").environ["PATH"], "HOME": str(tmp_path), "ALFWORLD_DATA": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-m", "fasteto", "check", "--tasks", "1"], capture_output=True,
                          text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "ALFWorld skipped" in proc.stdout and "Going on with ScienceWorld alone" in proc.stdout
    assert "9_412" in proc.stdout and "environments OK" in proc.stdout


def test_self_play_pairs_need_no_expert(tmp_path, capsys):
    explored = tmp_path / "explored.json"
    explored.write_text(json.dumps([_traj("a", 0.2, 2), _traj("a", 0.9, 1), _traj("b", 0.5, 1)]))
    assert main(["pairs", "--self-play", str(explored), "-o", str(tmp_path / "sp.json")]) == 0
    assert "wrote 1 pairs" in capsys.readouterr().out
    [pair] = json.loads((tmp_path / "sp.json").read_text())
    assert (pair["id"], len(pair["chosen"]), len(pair["rejected"])) == ("a", 1, 3)
    with pytest.raises(SystemExit):
        main(["pairs", "--self-play", "e.json", str(explored), "-o", "x.json"])
