"""Benchmark fixtures. Run with ``.venv/bin/python -m pytest bench/ -q`` (not part of the test run).

``bench_report`` collects one summary line per comparison (e.g. memory and time ratios) and prints them
at the end of the run, uncaptured; shared helpers are in ``_common.py``.
"""

from __future__ import annotations

import pytest


class BenchReport:
    """Rows measured so far in this session (to compare two measurements of one run) and summary lines."""

    def __init__(self) -> None:
        self.rows: dict[tuple, dict] = {}
        self.lines: list[str] = []


_REPORT = pytest.StashKey[BenchReport]()


@pytest.fixture(scope="session")
def bench_report(request) -> BenchReport:
    return request.config.stash.setdefault(_REPORT, BenchReport())


def pytest_sessionstart(session) -> None:
    """Read the git state before anything runs: the code a long bench measures is the code it loaded at
    the start, whatever is committed or edited while it runs."""
    from _common import git_state

    git_state()


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:
    report = config.stash.get(_REPORT, None)
    if report is not None and report.lines:
        terminalreporter.section("benchmark comparisons")
        for line in report.lines:
            terminalreporter.write_line(line)
