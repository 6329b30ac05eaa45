"""Same observations, less work: three patches to TextWorld's PDDL engine (ALFWorld's).

Every ALFWorld step renders its feedback, and the command of every action valid in the new state, through
TextWorld's context-sensitive grammar (``textworld.envs.pddl.textgen``); every game start translates the
PDDL problem with Fast Downward. ``install()`` removes the repeated work:

- **parses**: ``ContextSensitiveGrammar.derive`` parses the same handful of template strings with a TatSu
  parser on every call, and each rule's condition goes through ``Rule.parse_conjunctive_query`` again.
  Both are pure functions of the text: ``_parse_and_convert(text, rule_name)`` is cached per (text, rule
  name), each call getting a deep copy (``derive`` sets a context on the symbols it is given), and
  ``parse_conjunctive_query(text)`` per text (the returned ``Rule`` is only read);
- **contexts**: ``copy_context`` deep-copies a context's ``variables`` (``EntityInfo`` objects) and
  ``mapping`` (placeholders and variables) for every symbol it derives, about 180 objects each time. The
  grammar only ever rebinds keys of those two dicts (``query`` updates them) and reads the objects (its
  eval symbols are attribute reads such as ``{o.name}``), so new dicts over the same objects derive the
  same text;
- **translations**: ``textworld.start`` builds a ``PddlState`` (two ``fast_downward.pddl2sas`` calls:
  the problem as is, and optimised for replanning), and ``reset()`` builds it again from the same
  strings. A translation's result is kept until its one repeat takes it: the reset reuses the load's,
  and a later reset of the same game translates afresh, so nothing carries over between episodes. The
  result is only read (``PddlState`` takes its actions, types, objects and initial facts).

Calls with TatSu tracing or any other keyword go to the original parser. Observations are unchanged: tests
play real games with and without the patches and compare every observation. Checked against TextWorld
1.7 and its Fast Downward; ``install`` refuses to patch functions it does not recognise.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import inspect
from collections.abc import Iterator

_ORIGINALS: dict[str, object] = {}
_KEPT: dict[tuple, tuple] = {}  # translation arguments → result, until one repeat takes it


def install() -> bool:
    """Patch TextWorld (idempotent). False, and nothing patched, when TextWorld is absent or its
    functions are not the ones this was written for."""
    if _ORIGINALS:
        return True
    try:
        import fast_downward
        import textworld.envs.pddl.textgen as textgen
        from textworld.logic import Rule
    except ImportError:
        return False
    parse, query = textgen.__dict__.get("_parse_and_convert"), Rule.__dict__.get("parse_conjunctive_query")
    copy_context, translate = textgen.__dict__.get("copy_context"), getattr(fast_downward, "pddl2sas", None)
    if not (callable(parse) and isinstance(query, classmethod) and _is_copy_context(copy_context)
            and callable(translate) and list(inspect.signature(translate).parameters)
            == ["domain", "problem", "verbose", "optimize"]):
        return False
    _ORIGINALS.update(parse=parse, query=query, copy_context=copy_context, translate=translate)
    cached_parse = functools.lru_cache(maxsize=4096)(lambda text, rule_name: parse(text, rule_name=rule_name))
    cached_query = functools.lru_cache(maxsize=4096)(lambda text: query.__func__(Rule, text))

    def parse_and_convert(text, rule_name="start", **kwargs):
        if kwargs.get("trace") or set(kwargs) - {"trace"} or not isinstance(text, str):
            return parse(text, rule_name=rule_name, **kwargs)
        return copy.deepcopy(cached_parse(text, rule_name))

    def parse_conjunctive_query(cls, expr):
        return cached_query(expr) if cls is Rule and isinstance(expr, str) else query.__func__(cls, expr)

    def pddl2sas(domain, problem, verbose=False, optimize=False):
        key = (domain, problem, verbose, optimize)
        if key in _KEPT:
            return _KEPT.pop(key)
        if any(k[:2] != (domain, problem) for k in _KEPT):
            _KEPT.clear()  # another game: its translations will not be repeated
        _KEPT[key] = _ORIGINALS["translate"](domain, problem, verbose=verbose, optimize=optimize)
        return _KEPT[key]

    textgen._parse_and_convert = parse_and_convert
    textgen.copy_context = _copy_context
    Rule.parse_conjunctive_query = classmethod(parse_conjunctive_query)
    fast_downward.pddl2sas = pddl2sas
    return True


def _copy_context(context: dict) -> dict:
    """``textgen.copy_context`` with new ``variables`` and ``mapping`` dicts over the same objects."""
    return {"state": context["state"], "facts": context["facts"], "variables": dict(context["variables"]),
            "mapping": dict(context["mapping"]), "entity_infos": context["entity_infos"]}


def _is_copy_context(fn) -> bool:
    """``fn`` is TextWorld 1.7's ``copy_context`` (a context of these five keys, two deep-copied)."""
    try:
        source = inspect.getsource(fn)
    except (OSError, TypeError):
        return False
    return all(f'"{k}": deepcopy(context["{k}"])' in source for k in ("variables", "mapping")) and \
        all(f'"{k}": context["{k}"]' in source for k in ("state", "facts", "entity_infos"))


def uninstall() -> None:
    """Put TextWorld's own functions back (tests compare both)."""
    if not _ORIGINALS:
        return
    import fast_downward
    import textworld.envs.pddl.textgen as textgen
    from textworld.logic import Rule

    textgen._parse_and_convert = _ORIGINALS.pop("parse")
    textgen.copy_context = _ORIGINALS.pop("copy_context")
    Rule.parse_conjunctive_query = _ORIGINALS.pop("query")
    fast_downward.pddl2sas = _ORIGINALS.pop("translate")
    _KEPT.clear()


@contextlib.contextmanager
def unpatched() -> Iterator[None]:
    """TextWorld's own functions inside the block; the patches as they were after."""
    was = bool(_ORIGINALS)
    uninstall()
    try:
        yield
    finally:
        if was:
            install()
