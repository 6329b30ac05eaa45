"""Shared fixtures: the real test data beside the repo (../shared/data) and the real engines."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def alfworld_data() -> Path:
    """ALFWorld's game files from ../shared/data/alfworld; the test skips when they are absent."""
    folder = SHARED_DATA / "alfworld"
    if not (folder / "json_2.1.1").is_dir():
        pytest.skip(f"ALFWorld test data not found at {folder} (CI has it beside the repo as ../shared)")
    return folder


@pytest.fixture(scope="session")
def sciworld_env():
    """One ScienceWorld simulator (one JVM) shared by the module's tests."""
    if shutil.which("java") is None:
        pytest.skip("ScienceWorld needs Java 17: no `java` on PATH")
    pytest.importorskip("scienceworld")
    from fasteto.envs.sciworld import SciWorldEnv

    env = SciWorldEnv()
    yield env
    env.close()


@pytest.fixture(scope="session")
def alfworld_env(alfworld_data):
    pytest.importorskip("alfworld")
    from fasteto.envs.alfworld import AlfWorldEnv

    env = AlfWorldEnv(alfworld_data)
    yield env
    env.close()
