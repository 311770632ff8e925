"""User-supplied name patterns (merge ``exclude``, an adapter's ``alpha_pattern``), matched in
time linear in the name's length.

Python's ``re`` backtracks: ``(a|aa)+$`` against a 40-character name runs for minutes. RE2 (``google-re2``, the
engine behind Go's ``regexp`` and Google's code search) compiles a pattern to an automaton and never backtracks;
what would need backtracking (backreferences, lookaround) is refused when the pattern is compiled, with an error
naming the key and the pattern. The syntax is otherwise Python's for everything a tensor-name pattern uses.
"""

from __future__ import annotations

from typing import Any

import re2

_OPTIONS = re2.Options()
_OPTIONS.log_errors = False  # the refusal is ours to word: no RE2 log lines on stderr


def compile_pattern(pattern: Any, key: str) -> Any:
    """``pattern`` compiled by RE2 (objects with ``search`` / ``match`` / ``fullmatch`` as ``re``'s), or a
    ValueError naming ``key`` and why RE2 refuses it."""
    if not isinstance(pattern, str):
        raise ValueError(f"{key}: expected a regular expression (text), got {type(pattern).__name__} {pattern!r}")
    try:
        return re2.compile(pattern, options=_OPTIONS)
    except re2.error as e:
        reason = e.args[0].decode(errors="replace") if e.args and isinstance(e.args[0], bytes) else str(e)
        raise ValueError(f"{key}={pattern!r}: not a pattern this library matches ({reason}); patterns are RE2 "
                         "syntax: Python's, without backreferences or lookaround") from None  # fmt: skip
