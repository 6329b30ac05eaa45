"""The run folder: what a run was asked to do, what it has finished, and what it measured.

A run folder holds ``config.json`` (the resolved config), ``versions.json`` (library versions and the
git SHA), ``state.json`` (the phases finished, with their results), ``metrics.jsonl`` (one line per
training step or evaluation) and each phase's files. Phases are marked done only after their files are
written, so a rerun after a kill skips what was finished and redoes only the phase that was cut.
"""

from __future__ import annotations

import json
import platform
import subprocess
from pathlib import Path
from typing import Any

from fasteto.data.formats import append_jsonl
from fasteto.utils.io import atomic_write_json


class RunFolderError(ValueError):
    """A run folder that cannot be resumed with this config."""


def versions() -> dict[str, str]:
    """Python, fasteto and the key libraries' versions, and the git SHA of the source when known."""
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for name in ("fasteto", "torch", "transformers", "scienceworld", "alfworld", "textworld"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = "not installed"
    sha = _git("rev-parse", "HEAD")
    out["git_sha"] = sha or "unknown"
    if sha:  # tracked files edited since that commit: the run is not exactly what the SHA names
        status = _git("status", "--porcelain", "--untracked-files=no")
        out["git_dirty"] = None if status is None else bool(status)
    return out


def _git(*args: str) -> str | None:
    """``git ARGS`` run in fasteto's source folder, its stripped output; None where git cannot answer."""
    try:
        return subprocess.run(["git", *args], capture_output=True, text=True, check=True,
                              cwd=Path(__file__).parent, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def _differences(old: Any, new: Any, prefix: str = "", defaults: Any = None) -> list[str]:
    """What differs between two configs; an option ``old`` lacks (added since that folder was made) counts
    only where ``new`` sets it away from its default in ``defaults``."""
    if isinstance(old, dict) and isinstance(new, dict):
        defaults = defaults if isinstance(defaults, dict) else {}
        keys = [k for k in dict.fromkeys([*old, *new])
                if k in old or k not in defaults or new.get(k) != defaults[k]]
        return [d for k in keys
                for d in _differences(old.get(k), new.get(k), f"{prefix}{k}.", defaults.get(k))]
    return [] if old == new else [f"{prefix.rstrip('.')} is {old!r} there, {new!r} here"]


class RunFolder:
    """One run's folder. Opening it with a config different from the one it was made with is an error;
    ``defaults`` (the config dataclass's, as a dict) lets a folder made before an option existed resume
    while that option stays at its default."""

    def __init__(self, path: str | Path, config: dict[str, Any], defaults: dict[str, Any] | None = None):
        self.path = Path(path)
        self.config = config
        config_file = self.path / "config.json"
        if config_file.exists():
            old = json.loads(config_file.read_text())
            if diffs := _differences(old, config, defaults=defaults):
                raise RunFolderError(
                    f"run folder {self.path} was made with a different config ({'; '.join(diffs[:5])}). "
                    "Rerun with the same options to resume it, or pass another --run_dir."
                )
        else:
            atomic_write_json(config_file, config)
        atomic_write_json(self.path / "versions.json", versions())
        self._state_file = self.path / "state.json"
        self.state: dict[str, Any] = (
            json.loads(self._state_file.read_text()) if self._state_file.exists() else {"done": {}}
        )

    def file(self, *parts: str) -> Path:
        """A file's path in the run folder; its folder is created."""
        path = self.path.joinpath(*parts)
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    def folder(self, *parts: str) -> Path:
        """A folder in the run folder, created."""
        path = self.path.joinpath(*parts)
        path.mkdir(parents=True, exist_ok=True)
        return path

    def done(self, phase: str) -> bool:
        return phase in self.state["done"]

    def result(self, phase: str) -> Any:
        return self.state["done"][phase]

    def mark(self, phase: str, result: Any = None) -> None:
        """Record ``phase`` as finished (after its files are written), with a JSON-able result."""
        self.state["done"][phase] = result
        atomic_write_json(self._state_file, self.state)

    def log(self, record: dict[str, Any]) -> None:
        append_jsonl(self.path / "metrics.jsonl", record)
