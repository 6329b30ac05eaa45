"""Read and write ETO's files: SFT / expert trajectories, explored trajectories and DPO pairs.

Shapes (METHOD.md, "Data formats of the public code"):

- trajectory file: ``[{"id", <extra keys>..., "conversations": [{"from", "value"}, ...], "reward"?}]``;
  ``reward`` is optional in an SFT (expert) file and required, number or null, in an explored file;
- DPO file: ``[{"id", "prompt": [msgs], "chosen": [msgs], "rejected": [msgs]}]``.

Every reader accepts a JSON list or JSON Lines (one object per line, blank lines allowed), told apart by
the first non-space character (``[`` means a JSON list). Writers emit a JSON list with indent 2 through
an atomic rename, so a file we wrote reads back and writes again byte for byte.

Streaming stores (the explorer's output while it runs) use :func:`append_jsonl`, and are read back with
:func:`read_jsonl_tolerant`, which forgives only a final line cut short by a crash.

Every problem raises :class:`FormatError` naming the file, the item's 0-based position, its id when
known, and what is wrong.
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Any

from fasteto.data.types import GPT, HUMAN, Message, Pair, Trajectory
from fasteto.utils.io import atomic_write_json

logger = logging.getLogger(__name__)

KINDS = ("sft", "explored")
_PAIR_KEYS = ("id", "prompt", "chosen", "rejected")


class FormatError(ValueError):
    """A file (or record) that does not have the shape ETO's files have; the message says where."""


def _where(source: str, index: int | None = None, item_id: Any = None, line: int | None = None) -> str:
    """``"path: item 3 (id '12_4') at line 5"``: the prefix of every error message."""
    text = source
    if index is not None:
        text += f": item {index}"
        if item_id is not None:
            text += f" (id {item_id!r})"
    if line is not None:
        text += f" at line {line}" if index is not None else f": line {line}"
    return text


def _type_name(value: Any) -> str:
    if value is None:
        return "null"
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "a list",
            dict: "an object"}.get(type(value), type(value).__name__)


# ----------------------------------------------------------------------------------------- loading


def _decode_json_list(path: str, data: bytes) -> list[tuple[int | None, Any]]:
    try:
        value = json.loads(data.decode("utf-8-sig"))
    except UnicodeDecodeError as e:
        raise FormatError(f"{path}: not UTF-8 text (bad byte at offset {e.start})") from None
    except json.JSONDecodeError as e:
        raise FormatError(f"{path}: not valid JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
    if not isinstance(value, list):
        raise FormatError(f"{path}: the top level is {_type_name(value)}; expected a JSON list of records")
    return [(None, item) for item in value]


def _decode_jsonl(path: str, data: bytes, tolerate_last: bool) -> list[tuple[int | None, Any]]:
    """``(line number, value)`` for every non-blank line; split on bytes so that a line cut mid-way
    through a UTF-8 character, or a U+2028 inside a string, cannot shift the lines."""
    numbered = [(n, raw) for n, raw in enumerate(data.split(b"\n"), start=1) if raw.strip()]
    if numbered and numbered[0][0] == 1 and numbered[0][1].startswith(b"\xef\xbb\xbf"):
        numbered[0] = (1, numbered[0][1][3:])
    items: list[tuple[int | None, Any]] = []
    for pos, (lineno, raw) in enumerate(numbered):
        try:
            items.append((lineno, json.loads(raw.decode("utf-8"))))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            if tolerate_last and pos == len(numbered) - 1:
                logger.warning("%s: ignoring an unparsable last line %d (a write cut short?)", path, lineno)
                break
            what = f"{e.msg} at column {e.colno}" if isinstance(e, json.JSONDecodeError) else "not UTF-8"
            hint = ""
            if pos == 0 and raw.lstrip().startswith(b"{") and _parses_whole(data):
                hint = ("; the file holds a single JSON object spread over several lines: "
                        "expected a JSON list of records or JSON Lines (one object per line)")
            raise FormatError(f"{path}: line {lineno} (item {pos}): not valid JSON: {what}{hint}") from None
    return items


def _parses_whole(data: bytes) -> bool:
    try:
        json.loads(data.decode("utf-8-sig"))
    except ValueError:
        return False
    return True


def _load_items(path: str | os.PathLike, tolerate_last: bool = False) -> list[tuple[int | None, Any]]:
    """``(line number or None, value)`` for every record of a JSON list or JSON Lines file."""
    name = os.fspath(path)
    data = Path(path).read_bytes()
    head = data.lstrip(b"\xef\xbb\xbf").lstrip()
    if not head:
        raise FormatError(f"{name}: the file is empty; expected a JSON list of records or JSON Lines")
    if head.startswith(b"["):
        return _decode_json_list(name, data)
    return _decode_jsonl(name, data, tolerate_last)


# ---------------------------------------------------------------------------------------- validation


def _check_id(record: dict, where: str) -> Any:
    if "id" not in record:
        raise FormatError(f"{where}: missing key 'id'")
    item_id = record["id"]
    if isinstance(item_id, bool) or not isinstance(item_id, (str, int)):
        raise FormatError(f"{where}: 'id' is {_type_name(item_id)}; expected a string or an integer")
    return item_id


def _check_messages(record: dict, key: str, where: str, first_role: str) -> list[Message]:
    """A non-empty list of ``{"from", "value"}`` whose roles alternate starting with ``first_role``."""
    if key not in record:
        raise FormatError(f"{where}: missing key {key!r}")
    messages = record[key]
    if not isinstance(messages, list):
        raise FormatError(f"{where}: {key!r} is {_type_name(messages)}; expected a list of messages")
    if not messages:
        raise FormatError(f"{where}: {key!r} is empty; expected at least one message")
    other = GPT if first_role == HUMAN else HUMAN
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict):
            raise FormatError(f"{where}: {key!r} message {i} is {_type_name(msg)}; "
                              f"expected an object {{\"from\": ..., \"value\": ...}}")
        for field in ("from", "value"):
            if field not in msg:
                raise FormatError(f"{where}: {key!r} message {i} has no {field!r} key")
        role, value = msg["from"], msg["value"]
        if role not in (HUMAN, GPT):
            raise FormatError(f"{where}: {key!r} message {i} has role {role!r}; expected 'human' or 'gpt'")
        expected = first_role if i % 2 == 0 else other
        if role != expected:
            raise FormatError(f"{where}: {key!r} message {i} has role {role!r}; expected {expected!r} "
                              f"(roles alternate {first_role}, {other}, ... from message 0)")
        if not isinstance(value, str):
            raise FormatError(f"{where}: {key!r} message {i} 'value' is {_type_name(value)}; "
                              "expected a string")
    return messages


def _check_reward(record: dict, where: str, required: bool) -> float | None:
    if "reward" not in record:
        if required:
            raise FormatError(f"{where}: missing key 'reward'; an explored record needs a reward "
                              "(a number, or null when the episode has no usable outcome)")
        return None
    reward = record["reward"]
    if reward is None:
        return None
    if isinstance(reward, bool) or not isinstance(reward, (int, float)):
        raise FormatError(f"{where}: 'reward' is {_type_name(reward)}; expected a number or null")
    if not math.isfinite(reward):
        raise FormatError(f"{where}: 'reward' is {reward}; expected a finite number or null")
    return reward


def trajectory_from_record(record: Any, kind: str, source: str = "<record>", index: int | None = None,
                           line: int | None = None) -> Trajectory:
    """Validate one trajectory record (see the module docstring) and return it as a Trajectory.

    ``source``, ``index`` and ``line`` only go into error messages. Keys other than ``id``,
    ``conversations`` and ``reward`` are kept, in order, in ``Trajectory.extra``.
    """
    _check_kind(kind)
    where = _where(source, index, None, line)
    if not isinstance(record, dict):
        raise FormatError(f"{where}: the record is {_type_name(record)}; expected an object")
    item_id = _check_id(record, where)
    where = _where(source, index, item_id, line)
    conversations = _check_messages(record, "conversations", where, HUMAN)
    reward = _check_reward(record, where, required=kind == "explored")
    extra = {k: v for k, v in record.items() if k not in ("id", "conversations", "reward")}
    return Trajectory(id=item_id, conversations=conversations, reward=reward, extra=extra)


def pair_from_record(record: Any, source: str = "<record>", index: int | None = None,
                     line: int | None = None) -> Pair:
    """Validate one DPO record: ``prompt`` alternates from human and ends with human; ``chosen`` and
    ``rejected`` alternate from gpt. No other keys are allowed (they could not be written back)."""
    where = _where(source, index, None, line)
    if not isinstance(record, dict):
        raise FormatError(f"{where}: the record is {_type_name(record)}; expected an object")
    item_id = _check_id(record, where)
    where = _where(source, index, item_id, line)
    unknown = [k for k in record if k not in _PAIR_KEYS]
    if unknown:
        raise FormatError(f"{where}: unknown key {unknown[0]!r}; a DPO record holds only "
                          "'id', 'prompt', 'chosen' and 'rejected'")
    prompt = _check_messages(record, "prompt", where, HUMAN)
    if prompt[-1]["from"] != HUMAN:
        raise FormatError(f"{where}: 'prompt' ends with a 'gpt' message; it must end with the "
                          "'human' task message that chosen and rejected answer")
    chosen = _check_messages(record, "chosen", where, GPT)
    rejected = _check_messages(record, "rejected", where, GPT)
    return Pair(id=item_id, prompt=prompt, chosen=chosen, rejected=rejected)


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"kind must be 'sft' or 'explored', got {kind!r}")


# ---------------------------------------------------------------------------------- public readers


def read_trajectories(path: str | os.PathLike, kind: str) -> list[Trajectory]:
    """Read an SFT/expert (``kind="sft"``) or explored (``kind="explored"``) file.

    JSON list or JSON Lines. Duplicate ids are allowed (several explored samples of one task).
    Raises FormatError naming the file, item position, id and the problem.
    """
    _check_kind(kind)
    name = os.fspath(path)
    return [trajectory_from_record(value, kind, name, i, line)
            for i, (line, value) in enumerate(_load_items(path))]


def write_trajectories(path: str | os.PathLike, trajs: list[Trajectory], kind: str) -> None:
    """Write trajectories as a JSON list, indent 2, atomically.

    Key order: id, extra keys, conversations, reward. ``kind="explored"`` always writes ``reward``
    (null allowed); ``kind="sft"`` writes it only when it is not None. Each record is validated first,
    so a file we write can always be read back.
    """
    _check_kind(kind)
    name = os.fspath(path)
    records = [t.to_record(with_reward=kind == "explored") for t in trajs]
    for i, record in enumerate(records):
        trajectory_from_record(record, kind, f"{name} (writing)", i)
    atomic_write_json(path, records, indent=2)


def read_pairs(path: str | os.PathLike) -> list[Pair]:
    """Read a DPO file (JSON list or JSON Lines of ``{"id", "prompt", "chosen", "rejected"}``)."""
    name = os.fspath(path)
    return [pair_from_record(value, name, i, line) for i, (line, value) in enumerate(_load_items(path))]


def write_pairs(path: str | os.PathLike, pairs: list[Pair]) -> None:
    """Write DPO pairs as a JSON list, indent 2, atomically; each record is validated first."""
    name = os.fspath(path)
    records = [p.to_record() for p in pairs]
    for i, record in enumerate(records):
        pair_from_record(record, f"{name} (writing)", i)
    atomic_write_json(path, records, indent=2)


# ------------------------------------------------------------------------------ streaming (JSONL)


def append_jsonl(path: str | os.PathLike, record: dict[str, Any]) -> None:
    """Append ``record`` as one JSON line, then flush and fsync.

    Safe to resume after a crash: if the file does not end with a newline (a write was cut short), a
    last line that still parses is completed with its newline, and one that does not is cut off
    before appending, so a partial record never glues onto the new one.
    """
    line = json.dumps(record, ensure_ascii=False, allow_nan=False).encode("utf-8") + b"\n"
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+b") as f:
        _repair_tail(f, os.fspath(path))
        f.write(line)
        f.flush()
        os.fsync(f.fileno())


def _repair_tail(f: Any, name: str) -> None:
    """Make the file end with a newline (or be empty) before an append; see :func:`append_jsonl`."""
    size = f.seek(0, os.SEEK_END)
    if size == 0:
        return
    f.seek(size - 1)
    if f.read(1) == b"\n":
        return
    start = _last_line_start(f, size)
    f.seek(start)
    tail = f.read()
    try:
        json.loads(tail.decode("utf-8"))
        complete = True
    except ValueError:
        complete = False
    if complete:
        f.write(b"\n")
    else:
        logger.warning("%s: cutting off a partial last line (%d bytes) left by an interrupted write",
                       name, size - start)
        f.truncate(start)
    f.flush()


def _last_line_start(f: Any, size: int, chunk: int = 1 << 16) -> int:
    """Offset just after the last newline of the file (0 when there is none)."""
    end = size
    while end > 0:
        begin = max(0, end - chunk)
        f.seek(begin)
        found = f.read(end - begin).rfind(b"\n")
        if found >= 0:
            return begin + found + 1
        end = begin
    return 0


def read_jsonl_tolerant(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of a JSON Lines store, ignoring ONLY an unparsable last line (a crash mid-write).

    A bad line anywhere else, or a line that is not a JSON object, raises FormatError. A missing file
    reads as no records (a store that has not been started).
    """
    name = os.fspath(path)
    if not Path(path).exists():
        return []
    items = _decode_jsonl(name, Path(path).read_bytes(), tolerate_last=True)
    records = []
    for i, (line, value) in enumerate(items):
        if not isinstance(value, dict):
            raise FormatError(f"{_where(name, i, None, line)}: the record is {_type_name(value)}; "
                              "expected an object")
        records.append(value)
    return records
