"""Secrets stay out of logs and spans, and input cannot forge a log line (in process).

The same promises are checked end to end against gunicorn in
``tests/reliability/test_hostile_input.py``; these pin down the rules themselves.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode

import spyglass
from spyglass import runtime
from spyglass.config import DEFAULT_REDACT_KEYS, load_settings
from spyglass.light_span import LightSpanStarter
from spyglass.logs import flush_logs
from spyglass.redaction import REDACTED, Redactor, escape_control_characters, escape_json_line_breaks

REDACTOR = Redactor(DEFAULT_REDACT_KEYS)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("login failed for user=bob password=hunter2", "login failed for user=bob password=[REDACTED]"),
        ("db_password = s3cret; retrying", "db_password = [REDACTED]; retrying"),
        ('PASSWORD: \'hunter 2\' and token="a\\"b" ok', "PASSWORD: '[REDACTED]' and token=\"[REDACTED]\" ok"),
        (
            '{"password": "hunter2", "api_key": "k-1", "user": "u"}',
            '{"password": "[REDACTED]", "api_key": "[REDACTED]", "user": "u"}',
        ),
        ("{'password': 'hunter2'}", "{'password': '[REDACTED]'}"),
        ("Authorization: Basic dXNlcjpwYXNz", "Authorization: [REDACTED]"),
        ("Authorization: Bearer abc.def-ghi", "Authorization: [REDACTED]"),
        ("retried with Bearer abc.def-ghi== then gave up", "retried with Bearer [REDACTED] then gave up"),
        ("sent BEARER abc.def-ghi to the api", "sent BEARER [REDACTED] to the api"),  # no separator in the text
        ("X-Api-Key: key-123", "X-Api-Key: [REDACTED]"),
        ("Cookie: session=abc; theme=dark", "Cookie: [REDACTED]; theme=dark"),
        (
            "Invalid HTTP request line: 'GET /caf?token=abc&page=2&password=p HTTP/1.1'",
            "Invalid HTTP request line: 'GET /caf?token=[REDACTED]&page=2&password=[REDACTED] HTTP/1.1'",
        ),
        ("page=1;access_token=abc", "page=1;access_token=[REDACTED]"),
        ("x=password=hunter2", "x=password=[REDACTED]"),  # a pair inside a value is still found
        ("\u0130stanbul password=hunter2", "\u0130stanbul password=[REDACTED]"),  # lowercasing changes the length
        ('password="unterminated', 'password="[REDACTED]'),
    ],
)
def test_free_text_loses_secret_pairs_and_bearer_tokens(text: str, expected: str) -> None:
    """`key=value` / `key: value` pairs whose key names a secret, and bearer tokens, are redacted."""
    assert REDACTOR.redact_text(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "item looked up",
        "KeyError: 'password'",  # names a secret, holds none
        "password reset requested",
        "user=bob page=2",
        "password=",
        "",
    ],
)
def test_free_text_without_a_secret_value_is_returned_unchanged(text: str) -> None:
    assert REDACTOR.redact_text(text) is text


def test_free_text_follows_the_configured_words() -> None:
    """SPYGLASS_REDACT_KEYS decides for text as for fields; an empty list redacts nothing."""
    assert Redactor(("pin",)).redact_text("card pin=1234 password=x") == "card pin=[REDACTED] password=x"
    assert Redactor(()).redact_text("password=x, Bearer abc") == "password=x, Bearer abc"


@pytest.mark.parametrize(
    "text",
    [
        "a" * 200_000 + "password",
        "password" * 25_000,
        "password=" * 25_000,
        "x-" * 100_000 + "token: 1",
        "Bearer " * 30_000,
        '"password": "' * 15_000,
    ],
)
def test_redacting_text_takes_linear_time(text: str) -> None:
    """Client-sized text (200 KB, shaped to make a backtracking pattern quadratic) takes well under a second."""
    started = time.perf_counter()
    REDACTOR.redact_text(text)
    assert time.perf_counter() - started < 1.0


def test_query_strings_lose_secret_parameters_however_separated() -> None:
    assert REDACTOR.redact_query("access_token=abc&page=2") == "access_token=%5BREDACTED%5D&page=2"
    assert REDACTOR.redact_query("pass%77ord=x&a=1") == "password=%5BREDACTED%5D&a=1"
    assert REDACTOR.redact_query("page=1;access_token=abc") == "page=1;access_token=[REDACTED]"
    assert REDACTOR.redact_query("page=2&q=shoes") == "page=2&q=shoes"


def test_control_characters_become_visible_escapes() -> None:
    text = "a\nb\r\x1b[31m\x85\u2028\u2029\ud800é"
    assert escape_control_characters(text) == "a\\x0ab\\x0d\\x1b[31m\\x85\\u2028\\u2029\\ud800é"
    assert escape_control_characters("plain") == "plain"


def test_json_lines_keep_no_character_that_breaks_a_line() -> None:
    """C1 controls and U+2028/U+2029 are written as escapes: same JSON, one line for every reader."""
    value = "a\x85b\u2028c\u2029d\x9be é £ 中"
    line = escape_json_line_breaks(json.dumps(value, ensure_ascii=False).encode())
    assert json.loads(line) == value
    assert len(line.decode().splitlines()) == 1
    assert escape_json_line_breaks(b'"plain"') == b'"plain"'


# -- through the logging pipeline ----------------------------------------------------------------
@pytest.fixture
def logging_as(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> Iterator[Callable[..., Callable[[], str]]]:
    """Set spyglass up with the given settings; returns a reader of what it wrote to stdout."""

    def setup(**env: str) -> Callable[[], str]:
        runtime.init(
            load_settings(
                {
                    "OTEL_SERVICE_NAME": "unit",
                    "SPYGLASS_METRICS_PORT": "0",
                    "SPYGLASS_TRACES_FILE": str(tmp_path / "traces.jsonl"),
                    **env,
                }
            )
        )

        def output() -> str:
            flush_logs()
            return capfd.readouterr().out

        return output

    yield setup
    runtime.shutdown()


def test_log_calls_with_values_json_cannot_hold_write_one_line_and_never_raise(logging_as) -> None:
    """A lone surrogate, a 30-digit int, 300 levels of nesting, a failing repr, a tuple key."""

    class Unprintable:
        def __repr__(self) -> str:
            raise RuntimeError("no repr")

    output = logging_as()
    log = spyglass.get_logger("unit")
    nested: list = []
    for _ in range(300):
        nested = [nested]
    log.info("surrogate", value="\ud800")
    log.info("big", value=10**30)
    log.info("deep", value=nested)
    log.info("unprintable", value=Unprintable(), other=1)
    logging.getLogger("stdlib").warning("mapping", extra={"data": {(1, 2): "tuple key"}})
    lines = output().splitlines()
    records = [record for record in map(json.loads, lines) if not record["logger"].startswith("opentelemetry")]
    assert [record["event"] for record in records] == ["surrogate", "big", "deep", "unprintable", "mapping"]
    assert records[0]["value"] == "\ud800" and records[1]["value"] == 10**30
    assert records[3]["value"].startswith("<unserializable") and records[3]["other"] == 1
    assert all(record["service.name"] == "unit" for record in records)


def test_log_messages_and_tracebacks_lose_secret_values(logging_as) -> None:
    """Structlog and standard-library lines alike: the message, and the exception's text."""
    output = logging_as()
    log = spyglass.get_logger("unit")
    log.info("calling with token=abc123")
    logging.getLogger("gunicorn.error").warning("Invalid request line: 'GET /x?password=%s'", "hunter2")
    try:
        raise PermissionError("rejected password=hunter2 (Bearer abc123)")
    except PermissionError:
        log.exception("login failed")
        logging.getLogger("flask.app").exception("Exception on /login [POST]")
    text = output()
    assert "abc123" not in text and "hunter2" not in text
    records = [json.loads(line) for line in text.splitlines()]
    records = [record for record in records if not record["logger"].startswith("opentelemetry")]
    assert records[0]["event"] == "calling with token=[REDACTED]"
    assert records[1]["event"] == "Invalid request line: 'GET /x?password=[REDACTED]'"
    for record in records[2:]:
        assert record["exception"].endswith("PermissionError: rejected password=[REDACTED] (Bearer [REDACTED])")


def test_console_lines_cannot_be_broken_by_keys_values_or_exception_messages(logging_as) -> None:
    output = logging_as(SPYGLASS_LOG_FORMAT="console")
    log = spyglass.get_logger("unit")
    forged = "\n2001-01-01T00:00:00Z [error    ] forged"
    log.info("note", **{f"key{forged}": f"value{forged}\x1b[2J\ud800"})
    try:
        raise ValueError(f"bad input{forged}")
    except ValueError as exc:
        exc.add_note(f"note{forged}")
        log.exception("failed")
    text = output()
    assert "\x1b" not in text
    assert not any(line.startswith("2001-01-01") for line in text.splitlines())
    assert "ValueError: bad input\\x0a2001-01-01T00:00:00Z [error    ] forged" in text
    assert "note\\x0a2001" in text


# -- spans ---------------------------------------------------------------------------------------
def test_exceptions_recorded_on_spans_lose_secret_values() -> None:
    """The exception event's message and stack trace, and the status description `with span:` sets."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    starter = LightSpanStarter(provider, "unit", "1")
    span, *_ = starter.start("GET /login", None, {})
    span.record_exception(ValueError("login rejected password=hunter2 (Bearer abc123)"))
    span.end()
    other, *_ = starter.start("GET /login", None, {})
    with pytest.raises(KeyError), other:
        raise KeyError("token=abc123")
    first, second = exporter.get_finished_spans()
    attributes = first.events[0].attributes
    assert attributes["exception.message"] == "login rejected password=[REDACTED] (Bearer [REDACTED])"
    assert "hunter2" not in attributes["exception.stacktrace"] and REDACTED in attributes["exception.stacktrace"]
    assert second.status.status_code is StatusCode.ERROR
    assert "abc123" not in second.status.description and "abc123" not in str(second.events[0].attributes)
