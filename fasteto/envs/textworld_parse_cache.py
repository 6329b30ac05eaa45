"""Memoised template parsing for TextWorld's PDDL engine (ALFWorld's).

Every ALFWorld step renders its feedback text through TextWorld's context-sensitive grammar
(``textworld.envs.pddl.textgen``): ``ContextSensitiveGrammar.derive`` parses the same handful of template
strings with a TatSu parser on every call, and each rule's condition goes through
``Rule.parse_conjunctive_query`` again. Those parses are pure functions of the text, so ``install()``
caches them:

- ``textgen._parse_and_convert(text, rule_name)``: cached per (text, rule name); each call gets a deep
  copy, because ``derive`` sets a context on the symbols it is given;
- ``Rule.parse_conjunctive_query(text)``: cached per text (the returned ``Rule`` is only read).

Calls with TatSu tracing or any other keyword go to the original. Observations are unchanged: tests play
real games with and without the cache and compare every observation. On an AMD EPYC, replaying the
shipped expert actions of 8 training games (145 steps, resets included, 3 alternating repeats): 160-162
ms per step with TextWorld's parsing, 112-121 ms with the cache (a probe, not a bench row).
Checked against TextWorld 1.7; ``install`` refuses to patch functions it does not recognise.
"""

from __future__ import annotations

import contextlib
import copy
import functools
from collections.abc import Iterator

_ORIGINALS: dict[str, object] = {}


def install() -> bool:
    """Cache the parses (idempotent). False, and nothing patched, when TextWorld is absent or its
    functions are not the ones this was written for."""
    if _ORIGINALS:
        return True
    try:
        import textworld.envs.pddl.textgen as textgen
        from textworld.logic import Rule
    except ImportError:
        return False
    parse, query = textgen.__dict__.get("_parse_and_convert"), Rule.__dict__.get("parse_conjunctive_query")
    if not callable(parse) or not isinstance(query, classmethod):
        return False
    _ORIGINALS.update(parse=parse, query=query)
    cached_parse = functools.lru_cache(maxsize=4096)(lambda text, rule_name: parse(text, rule_name=rule_name))
    cached_query = functools.lru_cache(maxsize=4096)(lambda text: query.__func__(Rule, text))

    def parse_and_convert(text, rule_name="start", **kwargs):
        if kwargs.get("trace") or set(kwargs) - {"trace"} or not isinstance(text, str):
            return parse(text, rule_name=rule_name, **kwargs)
        return copy.deepcopy(cached_parse(text, rule_name))

    def parse_conjunctive_query(cls, expr):
        return cached_query(expr) if cls is Rule and isinstance(expr, str) else query.__func__(cls, expr)

    textgen._parse_and_convert = parse_and_convert
    Rule.parse_conjunctive_query = classmethod(parse_conjunctive_query)
    return True


def uninstall() -> None:
    """Put TextWorld's own functions back (tests compare both)."""
    if not _ORIGINALS:
        return
    import textworld.envs.pddl.textgen as textgen
    from textworld.logic import Rule

    textgen._parse_and_convert = _ORIGINALS.pop("parse")
    Rule.parse_conjunctive_query = _ORIGINALS.pop("query")


@contextlib.contextmanager
def uncached() -> Iterator[None]:
    """TextWorld's own parsing inside the block; the cache as it was after."""
    was = bool(_ORIGINALS)
    uninstall()
    try:
        yield
    finally:
        if was:
            install()
