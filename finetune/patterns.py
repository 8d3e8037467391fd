"""Glob patterns over parameter and checkpoint key names (``fc.*``, ``layer[12].*``).

``fnmatch``'s case-sensitive matching, where ``*`` also crosses dots: ``layer1.*`` matches
every parameter of ``layer1``. Freezing, partial loading and parameter-group rules share it.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable


def matches_any(name: str, patterns: Iterable[str]) -> bool:
    """Whether ``name`` matches one of ``patterns``."""
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns)


def unmatched_patterns(patterns: Iterable[str], names: Iterable[str]) -> list[str]:
    """The patterns that match none of ``names`` (a typo that would silently do nothing)."""
    names = list(names)
    return [
        pattern for pattern in patterns if not any(fnmatch.fnmatchcase(n, pattern) for n in names)
    ]
