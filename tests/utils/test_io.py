"""Atomic writes: all or nothing, with the usual file permissions."""

from __future__ import annotations

import os

import pytest

from fasteto.utils.io import atomic_write_json, atomic_write_text


def test_write_replaces_whole_and_uses_umask_permissions(tmp_path):
    path = tmp_path / "sub" / "out.json"
    atomic_write_json(path, {"a": 1})
    atomic_write_json(path, {"b": 2})
    assert path.read_text() == '{\n  "b": 2\n}\n'
    mask = os.umask(0)
    os.umask(mask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~mask
    assert [p.name for p in path.parent.iterdir()] == ["out.json"]


def test_failed_write_leaves_the_old_file_and_no_temp(tmp_path):
    path = tmp_path / "out.txt"
    atomic_write_text(path, "old")
    with pytest.raises(TypeError):
        atomic_write_text(path, None)  # fails while writing
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["out.txt"]
