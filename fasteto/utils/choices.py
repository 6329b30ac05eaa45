"""What each ``auto`` option resolved to in this process, and why: logged once at INFO on the
``fasteto`` logger (``python -m fasteto.train`` prints it) and kept, so that run folders
(``summary.json``) and benchmark rows record what actually ran.

A process-wide record on purpose: the choices are made deep inside ops and engines, where no run object
reaches, and they are facts about this process (its devices and libraries).
"""

from __future__ import annotations

import logging
import sys
import threading

_log = logging.getLogger("fasteto.auto")
_lock = threading.Lock()
_choices: dict[str, dict[str, str]] = {}


def record_choice(option: str, chosen: str, why: str) -> None:
    """Record that ``option`` (e.g. ``"fused_token_logprobs impl (cpu)"``) set to auto resolved to
    ``chosen`` because ``why``. Logged the first time, and again whenever the choice changes."""
    with _lock:
        if _choices.get(option, {}).get("chosen") == chosen:
            return
        _choices[option] = {"chosen": chosen, "why": why}
    _log.info("%s: auto chose %r (%s)", option, chosen, why)


def auto_choices() -> dict[str, dict[str, str]]:
    """``{option: {"chosen", "why"}}`` for every auto option resolved so far in this process."""
    with _lock:
        return {option: dict(entry) for option, entry in _choices.items()}


def forget_choices() -> None:
    """Clear the record (tests; a long-lived process changing devices)."""
    with _lock:
        _choices.clear()


class _StdoutHandler(logging.Handler):
    """Writes to whatever ``sys.stdout`` is at the time (it may be replaced after setup)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            print(self.format(record), file=sys.stdout, flush=True)
        except Exception:  # noqa: BLE001  (logging must never break the run)
            self.handleError(record)


def print_choices() -> None:
    """Show the ``fasteto`` loggers' INFO messages (auto choices, model conversion) on stdout, as
    ``fasteto: ...`` lines; for command-line entry points, never at import. Idempotent."""
    logger = logging.getLogger("fasteto")
    if not any(isinstance(h, _StdoutHandler) for h in logger.handlers):
        handler = _StdoutHandler()
        handler.setFormatter(logging.Formatter("fasteto: %(message)s"))
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)
