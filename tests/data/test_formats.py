"""ETO's file formats: exact round trips and an actionable error for each kind of malformed file."""

from __future__ import annotations

import json

import pytest

from fasteto.data.formats import (
    FormatError,
    append_jsonl,
    read_jsonl_tolerant,
    read_pairs,
    read_trajectories,
    write_pairs,
    write_trajectories,
)
from fasteto.data.types import Pair, Trajectory


def h(value: str) -> dict:
    return {"from": "human", "value": value}


def g(value: str) -> dict:
    return {"from": "gpt", "value": value}


# What write_trajectories(kind="explored") must produce, written out by hand: key order id, extra keys,
# conversations, reward; an int reward stays an int; a null reward is written; non-ASCII stays as is.
EXPLORED_TEXT = """[
  {
    "id": "a",
    "game_file": "g/a",
    "conversations": [
      {
        "from": "human",
        "value": "I"
      },
      {
        "from": "gpt",
        "value": "OK"
      }
    ],
    "reward": 1
  },
  {
    "id": 7,
    "conversations": [
      {
        "from": "human",
        "value": "caf\u00e9\\n"
      }
    ],
    "reward": null
  }
]
"""

EXPLORED_RECORDS = [
    {"reward": 1, "id": "a", "conversations": [h("I"), g("OK")], "game_file": "g/a"},
    {"id": 7, "conversations": [h("caf\u00e9\n")], "reward": None},
]


def test_explored_round_trip_from_json_list(tmp_path):
    src, out = tmp_path / "in.json", tmp_path / "out.json"
    src.write_text(json.dumps(EXPLORED_RECORDS), encoding="utf-8")
    trajs = read_trajectories(src, "explored")
    assert trajs == [
        Trajectory("a", [h("I"), g("OK")], 1, {"game_file": "g/a"}),
        Trajectory(7, [h("caf\u00e9\n")], None, {}),
    ]
    write_trajectories(out, trajs, "explored")
    assert out.read_text(encoding="utf-8") == EXPLORED_TEXT
    first = out.read_bytes()
    write_trajectories(out, read_trajectories(out, "explored"), "explored")
    assert out.read_bytes() == first


def test_explored_round_trip_from_json_lines(tmp_path):
    src, out = tmp_path / "in.jsonl", tmp_path / "out.json"
    lines = [json.dumps(r, ensure_ascii=False) for r in EXPLORED_RECORDS]
    src.write_text("\n" + lines[0] + "\n\n  \n" + lines[1] + "\n", encoding="utf-8")
    write_trajectories(out, read_trajectories(src, "explored"), "explored")
    assert out.read_text(encoding="utf-8") == EXPLORED_TEXT
    first = out.read_bytes()
    write_trajectories(out, read_trajectories(out, "explored"), "explored")
    assert out.read_bytes() == first


def test_sft_writes_reward_only_when_present(tmp_path):
    out = tmp_path / "sft.json"
    trajs = [Trajectory(1, [h("I")], None), Trajectory(2, [h("I")], 0.25)]
    write_trajectories(out, trajs, "sft")
    assert [sorted(r) for r in json.loads(out.read_text())] == [
        ["conversations", "id"], ["conversations", "id", "reward"]]
    assert read_trajectories(out, "sft") == trajs
    first = out.read_bytes()
    write_trajectories(out, read_trajectories(out, "sft"), "sft")
    assert out.read_bytes() == first


def test_pairs_round_trip(tmp_path):
    src, out = tmp_path / "pairs.jsonl", tmp_path / "pairs.json"
    pair = Pair("12_4", [h("I"), g("OK"), h("T")], [g("a1"), h("o1"), g("a2")], [g("b1")])
    src.write_text(json.dumps(pair.to_record()) + "\n", encoding="utf-8")
    assert read_pairs(src) == [pair]
    write_pairs(out, [pair])
    first = out.read_bytes()
    assert json.loads(first) == [pair.to_record()]
    assert list(json.loads(first)[0]) == ["id", "prompt", "chosen", "rejected"]
    write_pairs(out, read_pairs(out))
    assert out.read_bytes() == first


# ----------------------------------------------------------------------------- trajectory errors

GOOD = {"id": "a", "conversations": [h("I"), g("OK")], "reward": 0.5}


_DROP = object()  # a value for _item that removes the key


def _item(**changes) -> dict:
    record = {**GOOD, "id": "b", **changes}
    return {k: v for k, v in record.items() if v is not _DROP}


@pytest.mark.parametrize("bad, kind, problem", [
    (_item(conversations=_DROP), "sft", "missing key 'conversations'"),
    (_item(conversations=[]), "sft", "'conversations' is empty; expected at least one message"),
    (_item(conversations="hi"), "sft", "'conversations' is a string; expected a list of messages"),
    (_item(conversations=[h("I"), h("again")]), "sft",
     ("'conversations' message 1 has role 'human'; expected 'gpt' (roles alternate human, gpt, ... "
      "from message 0)")),
    (_item(conversations=[g("OK")]), "sft", "'conversations' message 0 has role 'gpt'; expected 'human'"),
    (_item(conversations=[h("I"), {"from": "robot", "value": "x"}]), "sft",
     "'conversations' message 1 has role 'robot'; expected 'human' or 'gpt'"),
    (_item(conversations=[h("I"), {"from": "gpt"}]), "sft", "'conversations' message 1 has no 'value' key"),
    (_item(conversations=[{"from": "human", "value": 3}]), "sft",
     "'conversations' message 0 'value' is an integer; expected a string"),
    (_item(reward="0.5"), "sft", "'reward' is a string; expected a number or null"),
    (_item(reward=True), "explored", "'reward' is a boolean; expected a number or null"),
    (_item(reward=_DROP), "explored", "missing key 'reward'; an explored record needs a reward"),
])
def test_bad_trajectory_record_names_file_position_and_id(tmp_path, bad, kind, problem):
    path = tmp_path / "explored.json"
    path.write_text(json.dumps([GOOD, bad]), encoding="utf-8")
    with pytest.raises(FormatError) as err:
        read_trajectories(path, kind)
    assert str(err.value).startswith(f"{path}: item 1 (id 'b'): {problem}")


def test_missing_reward_is_fine_for_sft(tmp_path):
    path = tmp_path / "sft.json"
    path.write_text(json.dumps([_item(reward=_DROP)]), encoding="utf-8")
    assert read_trajectories(path, "sft") == [Trajectory("b", [h("I"), g("OK")], None)]


def test_non_finite_reward(tmp_path):
    path = tmp_path / "x.json"
    path.write_text('[{"id": 4, "conversations": [{"from": "human", "value": "I"}], "reward": NaN}]')
    with pytest.raises(FormatError, match=r"x\.json: item 0 \(id 4\): 'reward' is nan; expected a finite"):
        read_trajectories(path, "explored")


@pytest.mark.parametrize("record, problem", [
    ({"conversations": [h("I")], "reward": 1}, "missing key 'id'"),
    ({"id": 1.5, "conversations": [h("I")], "reward": 1},
     "'id' is a number; expected a string or an integer"),
    ({"id": True, "conversations": [h("I")], "reward": 1}, "'id' is a boolean"),
    (["not", "an", "object"], "the record is a list; expected an object"),
])
def test_record_without_a_usable_id(tmp_path, record, problem):
    path = tmp_path / "x.json"
    path.write_text(json.dumps([GOOD, GOOD, record]), encoding="utf-8")
    with pytest.raises(FormatError) as err:
        read_trajectories(path, "explored")
    assert str(err.value).startswith(f"{path}: item 2: {problem}")


def test_bad_json_list_names_line_and_column(tmp_path):
    path = tmp_path / "sft.json"
    path.write_text('[\n  {"id": 1,}\n]\n', encoding="utf-8")
    with pytest.raises(FormatError) as err:
        read_trajectories(path, "sft")
    assert str(err.value) == f"{path}: not valid JSON: Expecting property name enclosed in double quotes " \
                             "at line 2 column 12"  # the "}" after the comma


def test_top_level_object(tmp_path):
    path = tmp_path / "sft.json"
    path.write_text('{\n  "id": 1\n}\n', encoding="utf-8")
    with pytest.raises(FormatError, match="single JSON object spread over several lines"):
        read_trajectories(path, "sft")


def test_empty_file(tmp_path):
    path = tmp_path / "sft.json"
    path.write_text(" \n", encoding="utf-8")
    with pytest.raises(FormatError, match=r"sft\.json: the file is empty"):
        read_trajectories(path, "sft")


def test_jsonl_bad_line_in_the_middle(tmp_path):
    path = tmp_path / "explored.jsonl"
    path.write_text(json.dumps(GOOD) + "\n\n{\"id\": \"b\", oops\n" + json.dumps(GOOD) + "\n")
    with pytest.raises(FormatError) as err:
        read_trajectories(path, "explored")
    assert str(err.value).startswith(f"{path}: line 3 (item 1): not valid JSON: Expecting property name")
    with pytest.raises(FormatError, match="line 3 \\(item 1\\)"):
        read_jsonl_tolerant(path)


def test_jsonl_record_error_names_item_id_and_line(tmp_path):
    path = tmp_path / "explored.jsonl"
    path.write_text(json.dumps(GOOD) + "\n\n" + json.dumps(_item(reward=_DROP)) + "\n")
    with pytest.raises(FormatError) as err:
        read_trajectories(path, "explored")
    assert str(err.value).startswith(f"{path}: item 1 (id 'b') at line 3: missing key 'reward'")


def test_truncated_last_line_is_tolerated_only_by_the_tolerant_reader(tmp_path):
    path = tmp_path / "store.jsonl"
    text = json.dumps(GOOD) + "\n" + json.dumps(_item()) + "\n"
    path.write_bytes(text.encode() + '{"id": "c", "conversations": [{"from": "human", "value": "caf\u00e9'
                     .encode()[:-1])  # cut inside the two-byte UTF-8 "é"
    assert read_jsonl_tolerant(path) == [GOOD, _item()]
    with pytest.raises(FormatError, match=r"store\.jsonl: line 3 \(item 2\): not valid JSON"):
        read_trajectories(path, "explored")


def test_tolerant_reader_rejects_non_objects_and_reads_a_missing_file_as_empty(tmp_path):
    path = tmp_path / "store.jsonl"
    assert read_jsonl_tolerant(path) == []
    path.write_text(json.dumps(GOOD) + "\n[1, 2]\n")
    with pytest.raises(FormatError, match=r"store\.jsonl: item 1 at line 2: the record is a list"):
        read_jsonl_tolerant(path)


def test_write_refuses_a_trajectory_it_could_not_read_back(tmp_path):
    path = tmp_path / "out.json"
    with pytest.raises(FormatError) as err:
        write_trajectories(path, [Trajectory("z", [g("OK")], 1.0)], "explored")
    assert str(err.value).startswith(f"{path} (writing): item 0 (id 'z'): 'conversations' message 0 has "
                                     "role 'gpt'; expected 'human'")
    assert not path.exists()


def test_unknown_kind(tmp_path):
    with pytest.raises(ValueError, match="kind must be 'sft' or 'explored'"):
        read_trajectories(tmp_path / "x.json", "expert")


# ---------------------------------------------------------------------------------- pair errors

GOOD_PAIR = {"id": "12_3", "prompt": [h("I"), g("OK"), h("T")], "chosen": [g("a1")], "rejected": [g("b1")]}


@pytest.mark.parametrize("changes, problem", [
    ({"chosen": [g("a1"), {"from": "robot", "value": "x"}]},
     "'chosen' message 1 has role 'robot'; expected 'human' or 'gpt'"),
    ({"prompt": [h("I"), g("OK")]}, "'prompt' ends with a 'gpt' message; it must end with the 'human'"),
    ({"prompt": [h("I"), h("T")]}, "'prompt' message 1 has role 'human'; expected 'gpt'"),
    ({"rejected": [h("o1"), g("b1")]}, ("'rejected' message 0 has role 'human'; expected 'gpt' "
                                        "(roles alternate gpt, human, ... from message 0)")),
    ({"chosen": [g("a1"), g("a2")]}, "'chosen' message 1 has role 'gpt'; expected 'human'"),
    ({"chosen": []}, "'chosen' is empty"),
    ({"rejected": None}, "'rejected' is null; expected a list of messages"),
    ({"score": 1}, "unknown key 'score'; a DPO record holds only 'id', 'prompt', 'chosen' and 'rejected'"),
])
def test_bad_pair_record(tmp_path, changes, problem):
    path = tmp_path / "pairs.json"
    path.write_text(json.dumps([GOOD_PAIR, GOOD_PAIR, GOOD_PAIR, {**GOOD_PAIR, "id": "12_4", **changes}]))
    with pytest.raises(FormatError) as err:
        read_pairs(path)
    assert str(err.value).startswith(f"{path}: item 3 (id '12_4'): {problem}")


def test_pair_missing_key(tmp_path):
    path = tmp_path / "pairs.jsonl"
    record = {k: v for k, v in GOOD_PAIR.items() if k != "rejected"}
    path.write_text(json.dumps(GOOD_PAIR) + "\n" + json.dumps(record) + "\n")
    with pytest.raises(FormatError) as err:
        read_pairs(path)
    assert str(err.value) == f"{path}: item 1 (id '12_3') at line 2: missing key 'rejected'"


# ------------------------------------------------------------------------------- streaming store


def test_append_jsonl_then_read(tmp_path):
    path = tmp_path / "sub" / "store.jsonl"
    append_jsonl(path, GOOD)
    append_jsonl(path, _item())
    assert path.read_text(encoding="utf-8") == json.dumps(GOOD) + "\n" + json.dumps(_item()) + "\n"
    assert read_trajectories(path, "explored") == [
        Trajectory("a", [h("I"), g("OK")], 0.5), Trajectory("b", [h("I"), g("OK")], 0.5)]


def test_append_after_a_crash_cuts_the_partial_line(tmp_path):
    path = tmp_path / "store.jsonl"
    append_jsonl(path, GOOD)
    with open(path, "ab") as f:
        f.write(b'{"id": "lost", "conv')
    assert read_jsonl_tolerant(path) == [GOOD]
    append_jsonl(path, _item())
    assert path.read_text() == json.dumps(GOOD) + "\n" + json.dumps(_item()) + "\n"
    assert [t.id for t in read_trajectories(path, "explored")] == ["a", "b"]


def test_append_after_a_complete_line_without_newline_keeps_it(tmp_path):
    path = tmp_path / "store.jsonl"
    path.write_text(json.dumps(GOOD))
    append_jsonl(path, _item())
    assert read_jsonl_tolerant(path) == [GOOD, _item()]


def test_append_refuses_nan(tmp_path):
    with pytest.raises(ValueError):
        append_jsonl(tmp_path / "s.jsonl", {"id": 1, "reward": float("nan")})
