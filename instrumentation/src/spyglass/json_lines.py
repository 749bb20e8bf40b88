"""One JSON object per log line: encoding that never raises, and UTC timestamps.

Shared by every writer of spyglass's log lines (the processor chain, the standard-library
formatter, the access log and the lines rendered later by the log writer's thread), so that all
of them escape, fall back and date their lines alike.
"""

from __future__ import annotations

import json
import re
import time
from typing import Any

import orjson

from spyglass.redaction import escape_json_line_breaks

__all__ = ["dumps", "json_string", "needs_escape", "utc_text", "utc_timestamp"]


def dumps(value: Any, newline: bool = False) -> bytes:
    """``value`` as one line of JSON (UTF-8), whatever it holds; never raises.

    With ``newline`` the line ends in one and is a bytes object of its own size, fit to be kept;
    without, it may hold a larger buffer and is meant to be copied (with its newline) or dropped.

    C1 controls, U+2028 and U+2029 are escaped (see :func:`spyglass.redaction.escape_json_line_breaks`);
    a value orjson cannot write (a lone surrogate, an int over 64 bits, deep nesting, a failing
    ``repr``) is written by the standard library's encoder, or as a placeholder.
    """
    try:
        line = orjson.dumps(value, default=repr)
    except Exception:
        line = _fallback_dumps(value)
    else:
        line = escape_json_line_breaks(line)
    # A copy in any case when the newline is added: the bytes orjson returns keep the whole
    # buffer it wrote them in (about 4 KiB, whatever their length), which lines waiting for
    # the writer or the log export would hold by the thousand.
    return line + b"\n" if newline else line


def _fallback_dumps(value: Any) -> bytes:
    """The standard library's encoder (ASCII only, any int); values it cannot write become placeholders."""
    try:
        return json.dumps(value, default=repr).encode("ascii")
    except Exception:
        pass
    if not isinstance(value, dict):
        value = {"event": value}
    safe: dict[str, Any] = {}
    for key, item in value.items():
        try:
            json.dumps(item, default=repr)
        except Exception:
            item = f"<unserializable {type(item).__name__}>"
        safe[key if isinstance(key, str) else f"<key {type(key).__name__}>"] = item
    return json.dumps(safe, default=repr).encode("ascii")


def json_string(value: str) -> str:
    """``value`` as a JSON string literal (lone surrogates and line-breaking characters escaped)."""
    return dumps(value).decode("utf-8")


needs_escape = re.compile(r'["\\\x00-\x1f\x80-\x9f\u2028\u2029\ud800-\udfff]').search
"""Whether a string holds a character JSON must escape (lone surrogates cannot be encoded as
they are) or one spyglass escapes so that no reader takes it for a line break."""

_SECOND_PREFIXES: dict[int, str] = {}
"""The text of the current second (``2026-11-24T10:00:00.``): one entry, replaced when the second changes."""


def utc_timestamp() -> str:
    """Now as ISO-8601 UTC with microseconds, like structlog's TimeStamper, at a fraction of its cost."""
    return utc_text(time.time_ns())[0]


def utc_text(epoch_ns: int) -> tuple[str, int]:
    """``epoch_ns`` as :func:`utc_timestamp` writes it, and as the nanoseconds since the epoch that text says."""
    micros = epoch_ns // 1000
    second, fraction = divmod(micros, 1_000_000)
    prefix = _SECOND_PREFIXES.get(second)
    if prefix is None:
        prefix = time.strftime("%Y-%m-%dT%H:%M:%S.", time.gmtime(second))
        _SECOND_PREFIXES.clear()
        _SECOND_PREFIXES[second] = prefix
    return f"{prefix}{fraction:06d}Z", micros * 1000
