"""Reading PromQL in tests: which metric names an expression selects.

The dashboards' and the rules' tests check those names against the metric catalog and the recorded
series, so a renamed metric cannot leave a panel or an alert reading nothing.
"""

from __future__ import annotations

import re

__all__ = ["metric_names"]

# PromQL words that are not metric names.
_KEYWORDS = frozenset({"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless", "offset"})
_KEYWORDS |= {"bool", "inf", "nan", "atan2"}


def metric_names(expression: str) -> set[str]:
    """The metric names ``expression`` selects: not functions, labels, keywords, strings or durations.

    A ``__name__`` matcher is returned as is for ``=`` and as ``~regex`` for ``=~``.
    """
    names = {f"~{regex}" for regex in re.findall(r'__name__\s*=~\s*"([^"]*)"', expression)}
    names |= set(re.findall(r'__name__\s*=\s*"([^"]*)"', expression))
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expression)
    text = re.sub(r"'(?:[^'\\]|\\.)*'", "''", text)
    text = re.sub(r"`[^`]*`", "``", text)
    text = re.sub(r"\{[^}]*\}", " ", text)  # matchers
    text = re.sub(r"\[[^\]]*\]", " ", text)  # ranges
    text = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    found = re.findall(r"(?<![\w:.$])([a-zA-Z_:][\w:]*)(?![\w:])(?!\s*\()", text)
    return names | {name for name in found if name.lower() not in _KEYWORDS}
