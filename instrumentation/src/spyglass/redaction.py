"""Keeping secrets and forged lines out of logs and span attributes.

Structured data (log fields, query parameters) is redacted by key: a value is replaced when its
key names a secret. Free text (log messages, exception messages and tracebacks, request lines a
server echoes) has no keys, so :meth:`Redactor.redact_text` looks for the two shapes secrets take
in prose:

* a ``key=value`` or ``key: value`` pair whose key names a secret, quoted or not
  (``password=hunter2``, ``"api_key": "abc"``, ``Authorization: Basic dXNlcg==``,
  ``?access_token=abc&page=2``): the value becomes ``[REDACTED]``;
* ``Bearer <token>`` anywhere: the token becomes ``[REDACTED]``.

Text with neither shape is returned unchanged (and a text naming no secret word costs one scan).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from urllib.parse import parse_qsl, urlencode

__all__ = ["REDACTED", "Redactor", "escape_control_characters", "escape_json_line_breaks"]

REDACTED = "[REDACTED]"
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]")
_CACHE_LIMIT = 4096
_SCALARS = frozenset((str, int, float, bool, type(None)))
_SEQUENCES = (list, tuple)

# A key is a run of key characters holding a secret word, then a separator, then a value: quoted,
# or an optional auth scheme and one run of value characters. Keys start where a run starts and
# the key group is atomic, so a search stays linear in the text.
_KEY_CHARS = r"[\w.\-]"
_SEPARATOR = r"(?P<sep>[\"']?[ \t]*[:=][ \t]*)"
_VALUE = (
    r"(?P<value>\"(?:[^\"\\\n]|\\.)*\"|'(?:[^'\\\n]|\\.)*'"
    r"|[\"']?(?:(?:bearer|basic|digest|token)[ \t]+)?[^\s&,;\"'<>()\[\]{}]+)"
)
_BEARER = r"(?P<scheme>\bbearer[ \t]+)(?P<token>[A-Za-z0-9\-._~+/]+=*)"


def _secret_text_pattern(words: tuple[str, ...], flags: int = 0) -> re.Pattern[str]:
    """The pattern of secret pairs and bearer tokens, over lowercased text (or any text with ``re.IGNORECASE``)."""
    alternatives = "|".join(re.escape(word) for word in sorted(words, key=len, reverse=True))
    key = rf"(?<!{_KEY_CHARS})(?P<key>(?>{_KEY_CHARS}*?(?:{alternatives}){_KEY_CHARS}*+))"
    return re.compile(f"{key}{_SEPARATOR}{_VALUE}|{_BEARER}", flags)


# C1 controls (U+0085, NEL, among them) and U+2028/U+2029 as orjson writes them (raw UTF-8):
# valid JSON, but line breaks to some readers (Python's str.splitlines, older JavaScript).
_JSON_LINE_BREAKING = re.compile(rb"\xc2[\x80-\x9f]|\xe2\x80[\xa8\xa9]")


def escape_json_line_breaks(line: bytes) -> bytes:
    r"""A line of UTF-8 JSON with C1 controls, U+2028 and U+2029 written as ``\uNNNN`` escapes.

    The JSON means the same; the line no longer holds a character that a reader splitting on
    Unicode line boundaries (Python's ``str.splitlines``, for one) would take for a line break.
    """
    if line.isascii() or (b"\xc2" not in line and b"\xe2\x80" not in line):
        return line
    return _JSON_LINE_BREAKING.sub(_escape_json_character, line)


def _escape_json_character(match: re.Match[bytes]) -> bytes:
    return b"\\u%04x" % ord(match.group().decode("utf-8"))


def escape_control_characters(text: str) -> str:
    r"""Replace control characters (newlines, ANSI escapes, ...) with visible escapes.

    C0 and C1 controls become ``\xNN``; the Unicode line and paragraph separators and lone
    surrogates (which cannot be written as UTF-8) become ``\uNNNN``.
    """
    if not _CONTROL.search(text):
        return text
    return _CONTROL.sub(_escape_one, text)


def _escape_one(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code <= 0xFF else f"\\u{code:04x}"


def _any_of(words: tuple[str, ...]) -> Callable[[str], bool]:
    """Whether a text contains one of ``words``: one substring search per word.

    Half the instructions of one pattern of alternatives (which tries every word at every
    position) on a message of a hundred characters.
    """

    def contains_one(text: str) -> bool:
        for word in words:  # noqa: SIM110 - cheaper than any() over a generator
            if word in text:
                return True
        return False

    return contains_one


class Redactor:
    """Decides which keys hold secrets and replaces their values.

    A key is secret when it contains one of the configured words, case-insensitively
    (``password`` matches ``db_password``, ``authorization`` matches
    ``http.request.header.authorization``).
    """

    def __init__(self, secret_words: Iterable[str]) -> None:
        self._words = tuple(word.lower() for word in secret_words if word)
        self._decisions: dict[str, bool] = {}
        # Free text is searched lowercased (a case-insensitive pattern costs several times more),
        # and only in full when it mentions a secret word or a bearer token at all.
        hints = (*self._words, "bearer")
        hints = tuple(word for word in hints if not any(other != word and other in word for other in hints))
        self._text_hint = _any_of(hints) if self._words else None
        self._secret_text = _secret_text_pattern(self._words)
        self._secret_text_any_case = _secret_text_pattern(self._words, re.IGNORECASE)

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

    def redact_event(self, event: dict) -> dict:
        """A log line's fields with secret values replaced, by key and in the free text of its ``event`` message.

        The message is replaced in ``event`` itself (or in the copy :meth:`redact_mapping` made):
        it must be a dict the caller owns, as a log processor chain's is.
        """
        event = self.redact_mapping(event)
        message = event.get("event")
        if type(message) is str:
            redacted = self.redact_text(message)
            if redacted is not message:
                event["event"] = redacted
        return event

    def _redact_sequence(self, items: list | tuple) -> list | tuple:
        redacted = [self.redact_mapping(item) if isinstance(item, dict) else item for item in items]
        if all(new is old for new, old in zip(redacted, items, strict=True)):
            return items
        return redacted

    def redact_query(self, query: str) -> str:
        """A query string with the values of secret parameters replaced.

        Parameters are found as ``parse_qsl`` splits them (``&``, percent-encoded names decoded)
        and as :meth:`redact_text` does (which also catches a ``;``-separated ``token=...``).
        """
        if not query:
            return query
        query = self.redact_text(query)
        pairs = parse_qsl(query, keep_blank_values=True)
        if not any(self.is_secret(name) for name, _ in pairs):
            return query
        return urlencode([(name, REDACTED if self.is_secret(name) else value) for name, value in pairs])

    def redact_text(self, text: str) -> str:
        """Free text with the values of secret ``key=value`` / ``key: value`` pairs and bearer tokens replaced."""
        hint = self._text_hint
        if hint is None:
            return text
        lowered = text.lower()
        if "=" not in text and ":" not in text:
            # A secret pair has a separator: without one, only a bearer token can be there (two
            # byte searches instead of the hint's pattern, most of a short message's cost).
            if "bearer" not in lowered:
                return text
        elif not hint(lowered):
            return text
        if len(lowered) == len(text):  # lowercasing kept every character in place: search that
            matches = self._secret_text.finditer(lowered)
        else:
            matches = self._secret_text_any_case.finditer(text)
        pieces: list[str] = []
        last = 0
        for match in matches:
            if match.start("token") >= 0:
                cut, resume, opening, closing = match.start("token"), match.end(), "", ""
            else:
                cut, resume = match.start("value"), match.end("value")
                opening = text[cut] if text[cut] in "\"'" else ""
                closing = opening if opening and resume - cut > 1 and text[resume - 1] == opening else ""
            pieces.append(text[last:cut])
            pieces.append(opening + REDACTED + closing)
            last = resume
        if not pieces:
            return text
        pieces.append(text[last:])
        return "".join(pieces)
