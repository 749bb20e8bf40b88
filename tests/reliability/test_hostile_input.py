"""Hostile input against a real gunicorn serving the instrumented shop (tests/apps/shop.py).

What a client can send (paths, methods, headers, trace context, baggage, bodies) must not
change what spyglass exposes beyond a fixed set of series, must not make it fail or log errors,
must not forge a log line, and must not carry a secret into the logs or the spans.

Requests are written on raw sockets: the point is to send what a well-behaved client library
would refuse to (odd methods, raw bytes, duplicate or oversized headers).
"""

from __future__ import annotations

import contextlib
import json
import random
import re
import socket
import string
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, unquote, unquote_to_bytes

import pytest
import redis
from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_openmetrics

from tests.conftest import Gunicorn, start_gunicorn, wait_for

KNOWN_METHODS = frozenset(("CONNECT", "DELETE", "GET", "HEAD", "OPTIONS", "PATCH", "POST", "PUT", "TRACE"))
ROUTES = frozenset(("/pid", "/items/<int:item_id>", "/fail", "/healthz", "/echo", "/note", "/login", "/publish"))
UNMATCHED = "<unmatched>"
SEED = 20240806
TRACE_ID = "0af7651916cd43dd8448eb211c80319c"
SPAN_ID = "b7ad6b7169203331"
VALID_TRACEPARENT = f"00-{TRACE_ID}-{SPAN_ID}-01"
FORGED = '{"level":"error","event":"forged"}'
# W3C baggage limits, as OpenTelemetry's W3CBaggagePropagator applies them on extract and on inject.
BAGGAGE_MAX_ENTRIES = 180
BAGGAGE_MAX_ENTRY_BYTES = 4096
BAGGAGE_MAX_BYTES = 8192


# -- a raw HTTP/1.1 client -----------------------------------------------------------------------
@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    @property
    def from_app(self) -> bool:
        """The request reached the instrumented app (gunicorn's own rejections carry no traceresponse)."""
        return "traceresponse" in self.headers

    @property
    def trace_id(self) -> str:
        return self.headers["traceresponse"].split("-")[1]


def raw_request(method: bytes | str, target: bytes | str, headers: list[tuple] = (), body: bytes = b"") -> bytes:
    """The bytes of one request, exactly as given (no validation, no encoding but latin-1)."""

    def raw(value: bytes | str) -> bytes:
        return value if isinstance(value, bytes) else value.encode("latin-1")

    lines = [raw(method) + b" " + raw(target) + b" HTTP/1.1", b"Host: shop.test", b"Connection: close"]
    lines += [raw(name) + b": " + raw(value) for name, value in headers]
    if body:
        lines.append(b"Content-Length: %d" % len(body))
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


def send(port: int, request: bytes, timeout: float = 30.0) -> Reply:
    """Send one request on a fresh connection and read the reply until the server closes it."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        # gunicorn may answer (and close) before reading an oversized request to its end.
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            sock.sendall(request)
        chunks = []
        while True:
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            chunks.append(chunk)
    data = b"".join(chunks)
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    assert status_line.startswith("HTTP/1."), f"no HTTP reply to {request[:120]!r}: {data[:200]!r}"
    headers = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return Reply(int(status_line.split()[1]), headers, body)


def get(server: Gunicorn, target: str, headers: list[tuple] = (), method: str = "GET", body: bytes = b"") -> Reply:
    return send(server.app_port, raw_request(method, target, headers, body))


def post_json(server: Gunicorn, target: str, payload: object, headers: list[tuple] = ()) -> Reply:
    body = json.dumps(payload).encode()
    return get(server, target, [("Content-Type", "application/json"), *headers], "POST", body)


# -- what the server exposes ---------------------------------------------------------------------
def series(server: Gunicorn) -> set[tuple]:
    """Every (sample name, labels) of the metrics endpoint: values and exemplars left out."""
    return {
        (sample.name, tuple(sorted(sample.labels.items())))
        for family in parse_openmetrics(server.scrape())
        for sample in family.samples
    }


def records_of(text: str) -> list[dict]:
    r"""The log records of ``text``, asserting that every line is exactly one JSON object.

    Lines are split on ``\n`` only, as log shippers do, and the text must split the same way for
    readers that also break lines at U+2028, U+0085 and the like (Python's ``str.splitlines``).
    """
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    assert len(text.splitlines()) == len(lines), "a character some readers take for a line break was written raw"
    records = []
    for line in lines:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            pytest.fail(f"log line is not one JSON object: {line[:300]!r}")
        assert isinstance(record, dict), line[:300]
        records.append(record)
    return records


class LogTail:
    """The log lines a server writes from now on."""

    def __init__(self, server: Gunicorn) -> None:
        self._path = server.log_path
        self._offset = self._path.stat().st_size

    def text(self) -> str:
        with open(self._path, "rb") as log_file:
            log_file.seek(self._offset)
            return log_file.read().decode("utf-8")

    def records(self) -> list[dict]:
        return records_of(self.text())

    def wait_for_access_lines(self, count: int, timeout: float = 10.0) -> list[dict]:
        """The records, once ``count`` access lines are among them (log lines are flushed every 0.1 s)."""
        records = wait_for(lambda: self._with_access_lines(count), timeout=timeout)
        assert records, f"fewer than {count} access lines after {timeout}s:\n{self.text()[-3000:]}"
        return records

    def _with_access_lines(self, count: int) -> list[dict] | None:
        records = self.records()
        return records if sum(1 for record in records if record.get("logger") == "spyglass.access") >= count else None


def unexpected_problems(records: list[dict]) -> list[dict]:
    """Records at warning level or above, except the expected notes on input that was refused.

    Those are gunicorn's on requests it rejected, and OpenTelemetry's (rate-limited) on invalid
    baggage or trace state it ignored.
    """
    problems = []
    for record in records:
        if record.get("level") in ("debug", "info"):
            continue
        if record.get("level") == "warning":
            if record.get("logger") == "gunicorn.error" and record["event"].startswith("Invalid request from"):
                continue
            if record.get("logger", "").startswith("opentelemetry."):
                continue
        problems.append(record)
    return problems


def exported_spans(server: Gunicorn) -> list[dict]:
    r"""The spans of the OTLP JSON lines file, with attribute values unwrapped.

    Lines are split on ``\n`` only: a client's U+0085 in a span attribute is written raw by the
    span file exporter (valid JSON, but a line break to ``str.splitlines``, which ``read_spans`` uses).
    """
    spans = []
    for line in server.traces_path.read_bytes().split(b"\n") if server.traces_path.exists() else ():
        try:
            request = json.loads(line)
        except json.JSONDecodeError:
            continue  # empty, or being written as we read: the next read has it
        for resource_spans in request["resourceSpans"]:
            for scope_spans in resource_spans["scopeSpans"]:
                for span in scope_spans["spans"]:
                    span["attributes"] = {a["key"]: next(iter(a["value"].values())) for a in span.get("attributes", [])}
                    spans.append(span)
    return spans


def spans_of_trace(server: Gunicorn, trace_id: str) -> list[dict]:
    spans = wait_for(lambda: [span for span in exported_spans(server) if span["traceId"] == trace_id])
    assert spans, f"no span of trace {trace_id} exported"
    return spans


def server_span(server: Gunicorn, reply: Reply) -> dict:
    assert reply.from_app, reply
    (span,) = [span for span in spans_of_trace(server, reply.trace_id) if span["kind"] == 2]
    return span


@pytest.fixture(scope="module")
def shop(tmp_path_factory: pytest.TempPathFactory, redis_url: str) -> Iterator[Gunicorn]:
    """The shop under gunicorn's default settings, publishing tasks to a queue of its own."""
    queue = f"hostile-{uuid.uuid4().hex[:8]}"
    server = start_gunicorn(tmp_path_factory.mktemp("hostile"), SHOP_BROKER_URL=redis_url, SHOP_QUEUE=queue)
    server.queue = queue  # type: ignore[attr-defined]
    yield server
    server.stop()
    client = redis.Redis.from_url(redis_url)
    client.delete(queue, f"_kombu.binding.{queue}")


# -- 1. ten thousand hostile requests ------------------------------------------------------------
PATH_PIECES = string.ascii_letters + string.digits + "-._~!$&'()*+,;=:@/?#[]"
ODD_CHARACTERS = "é中😀\u202e\u2028\u0085\x00\n\r\x1b\x7f\ufeff"


def random_path(rng: random.Random) -> str:
    """A request target: printable ASCII, `%`-escapes (valid, of any byte, of UTF-8, and broken), any length."""
    length = rng.choice((1, 3, 10, 40, 200, 1000, 3000, rng.randint(3900, 4600)))
    pieces = []
    size = 1
    while size < length:
        kind = rng.random()
        if kind < 0.6:
            piece = rng.choice(PATH_PIECES)
        elif kind < 0.75:
            piece = f"%{rng.randrange(256):02X}"
        elif kind < 0.9:
            piece = quote(rng.choice(ODD_CHARACTERS), safe="")
        else:
            piece = rng.choice(("%", "%Z9", "%%", "%u2028", "%e2%80"))
        pieces.append(piece)
        size += len(piece)
    path = "/" + "".join(pieces)
    decoded = unquote_to_bytes(path.split("?")[0].split("#")[0]).decode("latin-1")
    if decoded.rstrip("/") in ("/pid", "/fail", "/echo", "/note", "/login", "/publish") or decoded.startswith(
        ("/items/", "/health")
    ):
        return "/x" + path  # keep the expectation simple: a random path matches no route
    return path


def random_method(rng: random.Random) -> str:
    kind = rng.random()
    if kind < 0.45:
        return "GET"
    if kind < 0.6:
        return rng.choice(sorted(KNOWN_METHODS - {"CONNECT"}))
    if kind < 0.7:  # known methods in another case: Flask serves them, the metrics call them _OTHER
        return "".join(rng.choice((c.lower(), c)) for c in rng.choice(("get", "head", "options", "post")))
    if kind < 0.85:  # made-up verbs
        return "".join(rng.choices(string.ascii_letters, k=rng.randint(3, 20)))
    if kind < 0.9:  # tokens with every special character RFC 9110 allows
        return "".join(rng.choices(string.ascii_uppercase + "!#$%&'*+-.^_`|~", k=rng.randint(3, 20)))
    if kind < 0.95:  # 1-2 KB methods
        return "".join(rng.choices(string.ascii_letters, k=rng.randint(1000, 2000)))
    return rng.choice(("GE T", "GET\x00", "G\xe9T", "", "[GET]"))  # not a token: gunicorn answers 400


def random_headers(rng: random.Random) -> list[tuple]:
    kind = rng.random()
    if kind < 0.6:
        return []
    if kind < 0.72:  # one header just under gunicorn's 8190-byte field limit
        return [("X-Big", "".join(rng.choices(string.printable[:94], k=rng.randint(6000, 8170))))]
    if kind < 0.77:  # over the limit: 431
        return [("X-Big", "a" * rng.randint(8200, 12000))]
    if kind < 0.85:  # close to gunicorn's 100 fields
        return [(f"X-H{index}", "v" * rng.randint(1, 80)) for index in range(rng.randint(80, 97))]
    if kind < 0.88:  # over: 431
        return [(f"X-H{index}", "v") for index in range(rng.randint(101, 150))]
    if kind < 0.94:  # latin-1 and C1 bytes in values
        return [("User-Agent", bytes(rng.randrange(0x80, 0x100) for _ in range(200))), ("Cookie", "a=\xe9\x85")]
    return [("traceparent", rng.choice(MALFORMED_TRACEPARENTS)), ("baggage", rng.choice(MALFORMED_BAGGAGE))]


def hostile_request(rng: random.Random) -> bytes:
    kind = rng.random()
    if kind < 0.45:
        target = random_path(rng)
    elif kind < 0.8:
        target = f"/items/{rng.randint(1, 10 ** rng.randint(1, 30))}"
    elif kind < 0.9:
        target = "/pid"
    else:
        target = "/items/" + rng.choice(NOT_ITEM_IDS)
    return raw_request(random_method(rng), target, random_headers(rng))


NOT_ITEM_IDS = ("abc", "-1", "1.5", quote("\uff10"), "1" * 4000, "%31", "")


# One request of each kind the random stream sends to the app: every series it may create.
WARM_UP_METHODS = (*sorted(KNOWN_METHODS), "get", "Head", "options", "FROB")
WARM_UP_PATHS = ("/items/1", "/items/0", "/pid", "/no/such/path")


@pytest.mark.slow
def test_ten_thousand_hostile_requests_add_no_series_and_no_error(tmp_path: Path) -> None:
    """10,000 requests with random paths, methods and huge headers: no new series, no 5xx, no error line.

    gunicorn runs with ``--permit-unconventional-http-method`` so that lowercase and 1-2 KB
    methods reach the instrumentation instead of being refused by gunicorn. After a warm-up that
    sends one request of each kind, the set of series on the metrics endpoint must not change:
    routes come from the app (``<unmatched>`` otherwise) and methods from the known set
    (``_OTHER`` otherwise). Every request gets a 4xx (or 2xx), every log line is a JSON object,
    and the only warnings are gunicorn's notes on the requests it rejected.
    """
    server = start_gunicorn(
        tmp_path,
        "--permit-unconventional-http-method",
        OTEL_BSP_MAX_QUEUE_SIZE="20000",  # no span dropped in the burst: that would add a series of its own
    )
    try:
        warm_up = [raw_request(method, path) for method in WARM_UP_METHODS for path in WARM_UP_PATHS]
        warm_up_replies = [send(server.app_port, request) for request in warm_up]
        assert all(reply.from_app and reply.status < 500 for reply in warm_up_replies)
        # The span pipeline's counters get their first series when the warm-up's spans are exported.
        assert wait_for(lambda: len(exported_spans(server)) >= len(warm_up))
        time.sleep(0.3)
        before = series(server)
        rng = random.Random(SEED)
        hostile = [hostile_request(rng) for _ in range(10_000)]
        started = time.monotonic()
        with ThreadPoolExecutor(4) as pool:
            replies = list(pool.map(lambda request: send(server.app_port, request), hostile))
        elapsed = time.monotonic() - started
        after = series(server)
    finally:
        server.stop()
    statuses = sorted(Counter(reply.status for reply in replies).items())
    print(f"10,000 hostile requests in {elapsed:.1f}s, {len(before)} series before and after; statuses {statuses}")

    assert sorted(after - before) == [], "client input created series"
    assert after == before
    failed = [
        (request[:160], reply.status) for request, reply in zip(hostile, replies, strict=True) if reply.status >= 500
    ]
    assert failed == []
    served = [reply for reply in replies if reply.from_app]
    refused = [reply for reply in replies if not reply.from_app]
    assert {reply.status for reply in served} <= {200, 404, 405}
    assert {reply.status for reply in refused} <= {400, 414, 431}
    assert len(served) > 6000 and len(refused) > 500, (len(served), len(refused))

    records = records_of(server.log_text())
    access = [record for record in records if record.get("logger") == "spyglass.access"]
    assert len(access) == len(warm_up) + len(served), "one access line per request the app answered"
    assert {record["http.request.method"] for record in access} <= KNOWN_METHODS | {"_OTHER"}
    assert {record["http.route"] for record in access} <= ROUTES | {UNMATCHED}
    assert unexpected_problems(records) == []
    assert "Traceback" not in server.log_text()
    for span in exported_spans(server):
        attributes = span["attributes"]
        assert attributes["http.request.method"] in KNOWN_METHODS | {"_OTHER"}
        assert attributes.get("http.route", UNMATCHED) in ROUTES | {UNMATCHED}
        assert len(attributes["url.path"]) <= 1024
        assert len(attributes.get("http.request.method_original", "")) <= 1024


# -- 2. malformed trace context and baggage ------------------------------------------------------
MALFORMED_TRACEPARENTS = (
    "",
    "garbage",
    f"00-{TRACE_ID[:31]}-{SPAN_ID}-01",  # trace id one digit short
    f"00-{TRACE_ID}0-{SPAN_ID}-01",  # one digit long
    f"00-{TRACE_ID}-{SPAN_ID[:15]}-01",
    f"00-{TRACE_ID[:-1]}g-{SPAN_ID}-01",  # not hex
    f"00-{TRACE_ID.upper()}-{SPAN_ID}-01",  # W3C ids are lowercase
    f"00-{'0' * 32}-{SPAN_ID}-01",  # all-zero trace id
    f"00-{TRACE_ID}-{'0' * 16}-01",  # all-zero span id
    f"ff-{TRACE_ID}-{SPAN_ID}-01",  # version ff is invalid
    f"00-{TRACE_ID}-{SPAN_ID}-01-extra",  # version 00 has exactly four fields
    f"00-{TRACE_ID}-{SPAN_ID}-0z",
    f"00-{TRACE_ID}-{SPAN_ID}",
    f"00_{TRACE_ID}_{SPAN_ID}_01",
    f"{VALID_TRACEPARENT},{VALID_TRACEPARENT}",  # two values in one header
    f"00-{TRACE_ID}-{SPAN_ID}-01-" + "a" * 8000,  # huge
    "x" * 8100,
    f"00-{TRACE_ID}-{SPAN_ID}-\xe9\xe9",  # latin-1 bytes
)
MALFORMED_BAGGAGE = (
    ",,,",
    "=",
    "key",
    "k=v;;;;=",
    "%%%=%%%",
    "k=\xe9\x85",
    "k=v," * 2000,
    "a=" + "b" * 8100,
    ";".join(f"k{index}" for index in range(1500)),
)


def test_malformed_traceparent_is_ignored_and_the_request_served(shop: Gunicorn) -> None:
    """An invalid `traceparent` (W3C rules) starts a new trace: the request is served, nothing errs.

    The same header made valid continues the caller's trace, so the test tells the two apart.
    """
    tail = LogTail(shop)
    valid = get(shop, "/items/3", [("traceparent", VALID_TRACEPARENT)])
    assert valid.status == 200 and valid.trace_id == TRACE_ID
    assert server_span(shop, valid)["parentSpanId"] == SPAN_ID
    replies = {}
    for header in MALFORMED_TRACEPARENTS:
        replies[header] = reply = get(
            shop, "/items/3", [("traceparent", header), ("tracestate", "bad state,=,k=" + "v" * 300)]
        )
        assert reply.status == 200, (header[:80], reply.status)
    for header, reply in replies.items():
        assert reply.trace_id != TRACE_ID, header[:80]
        span = server_span(shop, reply)
        assert not span.get("parentSpanId"), header[:80]
        assert span["traceId"] == reply.trace_id
    records = tail.wait_for_access_lines(len(replies) + 1)
    assert unexpected_problems(records) == []
    assert "Traceback" not in tail.text()


def test_malformed_baggage_is_ignored_and_the_request_served(shop: Gunicorn) -> None:
    """Garbage or oversized `baggage` neither breaks the request nor the trace context beside it."""
    tail = LogTail(shop)
    count = 0
    for header in MALFORMED_BAGGAGE:
        alone = get(shop, "/items/4", [("baggage", header)])
        assert alone.status == 200 and alone.trace_id != TRACE_ID, header[:80]
        assert not server_span(shop, alone).get("parentSpanId")
        beside = get(shop, "/items/4", [("traceparent", VALID_TRACEPARENT), ("baggage", header)])
        assert beside.status == 200 and beside.trace_id == TRACE_ID, header[:80]
        count += 2
    records = tail.wait_for_access_lines(count)
    assert unexpected_problems(records) == []
    assert "Traceback" not in tail.text()


# -- 3. oversized baggage is capped where it goes: Celery message headers ------------------------
def published_headers(shop: Gunicorn, redis_url: str, baggage: list[str]) -> tuple[Reply, dict]:
    """Publish a task from a request carrying ``baggage`` headers; the headers of the queued message."""
    reply = get(shop, "/publish", [("baggage", value) for value in baggage], method="POST")
    assert reply.status == 200, reply
    task_id = json.loads(reply.body)["task_id"]
    client = redis.Redis.from_url(redis_url)
    for raw in client.lrange(shop.queue, 0, -1):  # type: ignore[attr-defined]
        message = json.loads(raw)
        if message["headers"].get("id") == task_id:
            return reply, message["headers"]
    pytest.fail(f"task {task_id} not in queue {shop.queue}")  # type: ignore[attr-defined]


def entries(header: str | None) -> list[str]:
    return header.split(",") if header else []


def test_oversized_baggage_is_capped_in_the_celery_messages_a_request_publishes(shop: Gunicorn, redis_url: str) -> None:
    """Baggage goes on to tasks within W3C limits: 180 entries, 4096 bytes an entry, 8192 bytes in all.

    spyglass copies baggage into no span attribute and no log field; it goes on only in the
    headers of the messages a request publishes (with the trace context). On the way in, entries
    beyond the 180th and entries over 4096 bytes are dropped, and a header over 8192 bytes
    (possible when a client repeats the header) is dropped whole; on the way out, entries are
    re-encoded and the list cut to fit 8192 bytes again.
    """
    tail = LogTail(shop)
    many = [f"k{index}=v{index}" for index in range(250)]
    reply, headers = published_headers(shop, redis_url, [",".join(many)])
    assert headers["traceparent"].split("-")[1] == reply.trace_id
    assert entries(headers["baggage"]) == many[:BAGGAGE_MAX_ENTRIES]

    big = "big=" + "x" * 5000
    _, headers = published_headers(shop, redis_url, [f"a=1,{big},b=2"])
    assert entries(headers["baggage"]) == ["a=1", "b=2"]

    # Values of characters baggage allows as they are but Celery's copy percent-encodes (3 bytes each).
    growing = [f"g{index}=" + "!" * 40 for index in range(170)]
    _, headers = published_headers(shop, redis_url, [",".join(growing)])
    sent = entries(headers["baggage"])
    assert len(headers["baggage"].encode()) <= BAGGAGE_MAX_BYTES
    assert 0 < len(sent) < len(growing)
    assert sent == [entry.replace("!", "%21") for entry in growing[: len(sent)]]

    repeated = [",".join(f"r{part}x{index}=" + "y" * 60 for index in range(70)) for part in range(3)]
    assert sum(len(value) for value in repeated) > BAGGAGE_MAX_BYTES
    reply, headers = published_headers(shop, redis_url, repeated)
    assert "baggage" not in headers
    assert headers["traceparent"].split("-")[1] == reply.trace_id

    for span in exported_spans(shop):
        assert not any(key.startswith(("k1", "big", "g1", "r0x")) for key in span["attributes"])
    records = tail.wait_for_access_lines(4)
    assert unexpected_problems(records) == []


# -- 4. log injection ----------------------------------------------------------------------------
INJECTION = f'ok"}}\n{FORGED}\r\n\x1b[31mred\x1b[0m\u2028{FORGED}\u0085{FORGED}\u2029'


def test_client_text_cannot_forge_a_json_log_line(shop: Gunicorn) -> None:
    """Client text cannot forge a line of the JSON log.

    Newlines, CR, ANSI escapes, U+2028/U+0085 and fake JSON objects from a path, a User-Agent, a
    query string or a logged body field (key or value) or an exception message stay inside the one
    JSON line of the record that carries them, and read back exactly as sent.
    """
    tail = LogTail(shop)
    path = "/no/" + quote(INJECTION, safe="")
    assert get(shop, path).status == 404
    user_agent = b"agent\x85" + FORGED.encode() + b"\xe2\x80\xa8" + FORGED.encode()  # raw bytes: latin-1 to WSGI
    reply = post_json(shop, "/note?q=" + quote(INJECTION, safe=""), {"text": INJECTION}, [("User-Agent", user_agent)])
    assert reply.status == 200
    refused = get(shop, "/items/1", [("User-Agent", "a\x1b[31mb")])  # gunicorn refuses control characters
    assert refused.status == 400 and not refused.from_app
    assert post_json(shop, "/echo", {f"key\n{FORGED}": INJECTION}).status == 200
    assert post_json(shop, "/login", {"user": INJECTION}).status == 500

    records = tail.wait_for_access_lines(4)
    raw = tail.text()
    for character in ("\r", "\x1b", "\u2028", "\u2029", "\u0085"):
        assert character not in raw, f"{character!r} written raw"
    assert not any(record.get("event") == "forged" for record in records)
    note = next(record for record in records if record.get("event") == "note")
    assert note["text"] == INJECTION and note["q"] == INJECTION
    assert note["user_agent"] == user_agent.decode("latin-1")
    stdlib = next(record for record in records if record.get("logger") == "tests.shop.stdlib")
    assert INJECTION in stdlib["event"]
    access = next(record for record in records if record.get("url.path", "").startswith("/no/"))
    assert access["url.path"] == "/no/" + INJECTION.encode().decode("latin-1")  # WSGI: bytes as latin-1
    echo = next(record for record in records if record.get("event") == "echo")
    assert echo[f"key\n{FORGED}"] == INJECTION
    failure = next(record for record in records if record.get("event") == "login failed")
    assert INJECTION in failure["exception"]


def test_values_json_cannot_hold_are_logged_without_failing_the_request(shop: Gunicorn) -> None:
    """A logged body with a lone surrogate, a 100-digit integer or 300 levels of nesting: 200, one line each."""
    tail = LogTail(shop)
    bodies = [b'{"k": "\\ud800 lone"}', b'{"k": ' + b"9" * 100 + b"}", b'{"k": ' + b"[" * 300 + b"]" * 300 + b"}"]
    for body in bodies:
        reply = get(shop, "/echo", [("Content-Type", "application/json")], "POST", body)
        assert reply.status == 200, body[:40]
    records = tail.wait_for_access_lines(len(bodies))
    logged = [record["k"] for record in records if record.get("event") == "echo"]
    assert len(logged) == 3
    assert "\ud800 lone" in logged and int("9" * 100) in logged
    nested = next(value for value in logged if isinstance(value, list))
    depth = 0
    while nested:
        nested, depth = nested[0], depth + 1
    assert depth == 299
    assert unexpected_problems(records) == []


def test_an_exception_quoting_unencodable_input_still_exports_its_span(shop: Gunicorn) -> None:
    """An exception message holding a client's lone surrogate is recorded escaped on the span.

    As it was, the span exporter could not encode it and lost the whole batch of spans with it.
    """
    reply = get(shop, "/login", [("Content-Type", "application/json")], "POST", b'{"user": "\\ud800 x"}')
    assert reply.status == 500
    span = server_span(shop, reply)
    (event,) = [event for event in span["events"] if event["name"] == "exception"]
    attributes = {a["key"]: next(iter(a["value"].values())) for a in event["attributes"]}
    assert attributes["exception.message"].startswith("login rejected for user=\\ud800 x ")


CONSOLE_RECORD = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d+Z \[")
FAKE_CONSOLE_LINE = "2001-01-01T00:00:00.000000Z [error    ] forged"


def test_client_text_cannot_forge_a_console_log_line(tmp_path: Path) -> None:
    """Client text cannot forge a line of the console log (SPYGLASS_LOG_FORMAT=console).

    Control characters are escaped in keys, values and exception messages, so no line but the
    records' own starts with a timestamp, and no escape sequence reaches the terminal.
    """
    server = start_gunicorn(tmp_path, SPYGLASS_LOG_FORMAT="console")
    injection = f"{INJECTION}\n{FAKE_CONSOLE_LINE}"
    try:
        assert get(server, "/no/" + quote(injection, safe="")).status == 404
        assert post_json(server, "/note?q=" + quote(injection, safe=""), {"text": injection}).status == 200
        assert post_json(server, "/echo", {f"key\n{FAKE_CONSOLE_LINE}": injection}).status == 200
        assert post_json(server, "/login", {"user": injection}).status == 500
        assert post_json(server, "/echo", {"k": "\ud800"}).status == 200
        time.sleep(0.5)
    finally:
        server.stop()
    text = server.log_text()
    for character in ("\r", "\x1b", "\u2028", "\u2029", "\u0085"):
        assert character not in text, f"{character!r} written raw"
    lines = text.splitlines()
    assert not any(line.startswith(("2001-01-01", "{")) for line in lines)
    note = [line for line in lines if CONSOLE_RECORD.match(line) and " note " in line]
    assert len(note) == 2 and all("\\x0a" in line for line in note)  # structlog's and the stdlib's
    assert any(line.startswith("PermissionError: login rejected for user=ok") for line in lines)


# -- 5. secrets ----------------------------------------------------------------------------------
def test_secrets_in_headers_queries_bodies_and_exceptions_reach_no_log_and_no_span(shop: Gunicorn) -> None:
    """No secret a client sends reaches the logs or the exported spans.

    Secrets in `Authorization`, `Cookie` and `X-Api-Key` headers, in `?token=&password=` query
    strings, in a `password` body field the app logs, in an exception message quoting
    `password=...` and a bearer token, and in a request line gunicorn refuses and logs: none of
    the values is written; each place that held one shows `[REDACTED]` instead.
    """
    secret = {name: f"{name}-{uuid.uuid4().hex}" for name in ("bearer", "cookie", "apikey", "query", "qpw", "semi")}
    secret |= {name: f"{name}-{uuid.uuid4().hex}" for name in ("body", "exception", "exception_token", "line")}
    tail = LogTail(shop)
    headers = [
        ("Authorization", f"Bearer {secret['bearer']}"),
        ("Cookie", f"session={secret['cookie']}; theme=dark"),
        ("X-Api-Key", secret["apikey"]),
    ]
    target = f"/items/5?token={secret['query']}&password={secret['qpw']}&page=2;access_token={secret['semi']}"
    item = get(shop, target, headers)
    assert item.status == 200
    echo = post_json(shop, "/echo", {"user": "ann", "password": secret["body"]}, headers)
    assert echo.status == 200
    login = post_json(
        shop, "/login", {"user": "ann", "password": secret["exception"], "token": secret["exception_token"]}
    )
    assert login.status == 500
    # gunicorn refuses a request line with raw non-ASCII and logs it: with its query string.
    refused = send(shop.app_port, b"GET /caf\xc3\xa9?token=" + secret["line"].encode() + b" HTTP/1.1\r\n\r\n")
    assert refused.status == 400

    records = tail.wait_for_access_lines(3)
    spans = [span for reply in (item, echo, login) for span in spans_of_trace(shop, reply.trace_id)]
    exported = shop.traces_path.read_text()
    logged = tail.text()
    for name, value in secret.items():
        assert value not in logged, f"{name} secret in the logs"
        assert value not in exported, f"{name} secret in the spans"

    item_span = next(span for span in spans if span["traceId"] == item.trace_id)
    query = unquote(item_span["attributes"]["url.query"])
    assert query == "token=[REDACTED]&password=[REDACTED]&page=2;access_token=[REDACTED]"
    login_span = next(span for span in spans if span["traceId"] == login.trace_id and span["kind"] == 2)
    (event,) = [event for event in login_span["events"] if event["name"] == "exception"]
    attributes = {a["key"]: next(iter(a["value"].values())) for a in event["attributes"]}
    assert "password=[REDACTED]" in attributes["exception.message"]
    assert "Bearer [REDACTED]" in attributes["exception.message"]
    assert "password=[REDACTED]" in attributes["exception.stacktrace"]
    assert next(record for record in records if record.get("event") == "echo")["password"] == "[REDACTED]"
    failures = [record for record in records if "exception" in record and record.get("trace_id") == login.trace_id]
    assert len(failures) == 2  # the app's log.exception and Flask's own error line
    assert all("password=[REDACTED]" in record["exception"] for record in failures)
    line = next(record for record in records if "Invalid HTTP request line" in record.get("event", ""))
    assert "token=[REDACTED]" in line["event"]
