"""The README's code examples run: each ```python block right after a ``<!-- runs in tests -->`` line is
executed as it stands (they build their own tiny models; nothing is downloaded)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
MARKER = "<!-- runs in tests -->"


def examples() -> list[str]:
    text = README.read_text(encoding="utf-8")
    return re.findall(re.escape(MARKER) + r"\s*```python\n(.*?)```", text, flags=re.S)


def test_readme_has_runnable_examples():
    assert len(examples()) >= 2, f"expected the ops and TRL examples after {MARKER!r} lines in {README}"


@pytest.mark.parametrize("index", range(len(examples())))
def test_readme_example_runs(index, capsys):
    code = examples()[index]
    exec(compile(code, f"README.md example {index}", "exec"), {"__name__": f"readme_example_{index}"})
