"""Keeping secrets and forged lines out of logs and span attributes."""

from __future__ import annotations

import re
from collections.abc import Iterable
from urllib.parse import parse_qsl, urlencode

__all__ = ["REDACTED", "Redactor", "escape_control_characters"]

REDACTED = "[REDACTED]"
_CONTROL = re.compile(r"[\x00-\x1f\x7f\x80-\x9f\u2028\u2029]")
_CACHE_LIMIT = 4096
_SCALARS = frozenset((str, int, float, bool, type(None)))
_SEQUENCES = (list, tuple)


def escape_control_characters(text: str) -> str:
    r"""Replace control characters (newlines, ANSI escapes, ...) with visible ``\\xNN`` escapes."""
    if not _CONTROL.search(text):
        return text
    return _CONTROL.sub(lambda match: f"\\x{ord(match.group()):02x}", text)


class Redactor:
    """Decides which keys hold secrets and replaces their values.

    A key is secret when it contains one of the configured words, case-insensitively
    (``password`` matches ``db_password``, ``authorization`` matches
    ``http.request.header.authorization``).
    """

    def __init__(self, secret_words: Iterable[str]) -> None:
        self._words = tuple(word.lower() for word in secret_words if word)
        self._decisions: dict[str, bool] = {}

    def is_secret(self, key: str) -> bool:
        """Whether values under ``key`` must not be shown."""
        decision = self._decisions.get(key)
        if decision is None:
            lowered = key.lower()
            decision = any(word in lowered for word in self._words)
            if len(self._decisions) < _CACHE_LIMIT:
                self._decisions[key] = decision
        return decision

    def redact_mapping(self, data: dict) -> dict:
        """A copy of ``data`` with secret values replaced, nested dicts and lists included.

        Returns ``data`` itself when nothing needed changing (the common case costs no copy).
        """
        changed: dict | None = None
        decisions = self._decisions
        for key, value in data.items():
            secret = decisions.get(key)
            if secret is None:
                secret = isinstance(key, str) and self.is_secret(key)
            if secret:
                replacement: object = REDACTED
            elif type(value) in _SCALARS:
                continue
            elif isinstance(value, dict):
                replacement = self.redact_mapping(value)
            elif isinstance(value, _SEQUENCES):
                replacement = self._redact_sequence(value)
            else:
                continue
            if replacement is not value:
                if changed is None:
                    changed = dict(data)
                changed[key] = replacement
        return data if changed is None else changed

    def _redact_sequence(self, items: list | tuple) -> list | tuple:
        redacted = [self.redact_mapping(item) if isinstance(item, dict) else item for item in items]
        if all(new is old for new, old in zip(redacted, items, strict=True)):
            return items
        return redacted

    def redact_query(self, query: str) -> str:
        """A query string with the values of secret parameters replaced."""
        if not query:
            return query
        pairs = parse_qsl(query, keep_blank_values=True)
        if not any(self.is_secret(name) for name, _ in pairs):
            return query
        return urlencode([(name, REDACTED if self.is_secret(name) else value) for name, value in pairs])
