"""Helpers shared by the benchmarks: what ran where, peak memory, and one JSON line per measurement in
``bench/results/<name>.jsonl``."""

from __future__ import annotations

import datetime
import functools
import importlib.metadata
import json
import platform
import subprocess
from collections.abc import Callable
from pathlib import Path

import torch

from fasteto.utils.choices import auto_choices

RESULTS = Path(__file__).resolve().parent / "results"
REPO = Path(__file__).resolve().parents[1]


def device_description(device: torch.device | str) -> str:
    """``"NVIDIA H100 80GB HBM3"``, or the CPU model and torch's thread count."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
                 if line.startswith("model name")]
        model = names[0] if names else model
    return f"{model} ({torch.get_num_threads()} torch threads)"


def versions() -> dict[str, str | None]:
    """Python and the installed torch / triton / transformers / peft / trl versions (None when not
    installed)."""
    found: dict[str, str | None] = {"python": platform.python_version()}
    for package in ("torch", "triton", "transformers", "peft", "trl"):
        try:
            found[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            found[package] = None
    return found


@functools.cache
def git_state() -> dict[str, str | bool | None]:
    """``git_sha`` (HEAD) and ``git_dirty`` (uncommitted changes outside ``bench/results/``), taken once
    per process: the rows a run appends to ``bench/results/`` must not mark the run's later rows dirty.
    None outside a git checkout."""

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    sha = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--", ".", ":(exclude)bench/results")
    return {"git_sha": sha, "git_dirty": None if status is None else bool(status)}


def record_result(name: str, row: dict) -> dict:
    """Append ``row`` plus time, git state, versions and the auto choices made so far in this process
    (``fasteto.utils.choices``) as one JSON line to ``bench/results/<name>.jsonl``.

    One ``write`` of one line on a file opened for appending, so concurrent runs do not interleave rows.
    Returns the full row.
    """
    full = {"utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            **git_state(), "versions": versions(), "auto_choices": auto_choices(), **row}
    RESULTS.mkdir(parents=True, exist_ok=True)
    with open(RESULTS / f"{name}.jsonl", "a", encoding="utf-8") as out:
        out.write(json.dumps(full, sort_keys=True) + "\n")
    return full


def peak_memory(fn: Callable[[], object], device: torch.device | str) -> tuple[int, str]:
    """Peak bytes torch allocates while ``fn()`` runs, above what was live before; and how it was measured.

    CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``. CPU: torch's profiler
    records every CPU allocator allocation and free (``profile_memory=True``); their running sum in time
    order peaks at the answer. Both count tensor memory only (not allocator caching or Python objects).
    """
    meter = MemoryMeter(device)
    meter.start()
    fn()
    return meter.stop()


class MemoryMeter:
    """``peak_memory`` split in two calls, for a window that a callback opens (e.g. at the end of a
    training loop's warm-up step): ``start()``, then ``stop() -> (peak bytes above what was live at
    start(), method)``. CUDA: synchronises at both ends. CPU: the window runs under torch's profiler."""

    def __init__(self, device: torch.device | str) -> None:
        self.device = torch.device(device)
        self._base = 0
        self._profiler = None

    def start(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
            return
        from torch.profiler import ProfilerActivity, profile

        self._profiler = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
        self._profiler.start()

    def stop(self) -> tuple[int, str]:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device) - self._base
            return peak, "torch.cuda.max_memory_allocated"
        if self._profiler is None:
            raise RuntimeError("MemoryMeter.stop() called before start()")
        self._profiler.stop()
        peak = _cpu_peak(self._profiler)
        self._profiler = None
        return peak, "torch.profiler allocation events (profile_memory=True), running sum"


def _cpu_peak(prof) -> int:
    """Peak of the running sum of the CPU allocations and frees a stopped profiler recorded."""
    from torch._C._profiler import _EventType

    events, stack = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        stack.extend(node.children)
        if node.tag == _EventType.Allocation and node.extra_fields.device.type == "cpu":
            events.append((node.start_time_ns, node.extra_fields.alloc_size))
    live = peak = 0
    for _, size in sorted(events):
        live += size
        peak = max(peak, live)
    return peak
