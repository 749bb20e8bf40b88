"""A real gunicorn with two workers, started with ``-c python:spyglass.gunicorn``, on loopback."""

from __future__ import annotations

import random
import string
import subprocess
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import psutil
import pytest
import requests

from spyglass.catalog import CATALOG, openmetrics_family_name
from tests.conftest import Gunicorn, read_spans, start_gunicorn, wait_for

DURATION = "http_server_request_duration_seconds"


def _count(families: dict, route: str, status: str | None = None) -> float:
    total = 0.0
    family = families.get(DURATION)
    for sample in family.samples if family else ():
        if sample.name != DURATION + "_count" or sample.labels["http_route"] != route:
            continue
        if status is None or sample.labels["http_response_status_code"] == status:
            total += sample.value
    return total


def _series(text_families: dict) -> set[tuple]:
    return {
        (sample.name, tuple(sorted(sample.labels.items())))
        for family in text_families.values()
        for sample in family.samples
    }


def _get_without_keepalive(url: str) -> requests.Response:
    # A fresh connection per request lets gunicorn's sync workers take turns.
    return requests.get(url, headers={"Connection": "close"}, timeout=10)


def test_counts_from_both_workers_are_summed_on_one_endpoint(gunicorn_server: Gunicorn) -> None:
    """Requests served by two different workers all appear in one scrape, labelled by route."""
    before = _count(gunicorn_server.families(), "/items/<int:item_id>")
    pids = Counter()
    sent = 0
    while len(pids) < 2 or sent < 60:
        response = _get_without_keepalive(f"{gunicorn_server.url}/items/{sent + 1}")
        assert response.status_code == 200
        pids[response.json()["pid"]] += 1
        sent += 1
        assert sent < 500, "gunicorn never used its second worker"
    families = gunicorn_server.families()
    assert len(pids) == 2
    assert _count(families, "/items/<int:item_id>", "200") - before == sent
    assert families["http_server_active_requests"].samples, "active requests gauge missing"
    assert families["spyglass_worker_processes"].samples[0].value == 2


def test_histogram_buckets_carry_trace_exemplars_from_workers(gunicorn_server: Gunicorn) -> None:
    """Exemplars survive multi-process mode and point at spans that were exported."""
    for index in range(10):
        _get_without_keepalive(f"{gunicorn_server.url}/items/{index + 1}")
    families = gunicorn_server.families()
    exemplars = [
        sample.exemplar
        for sample in families[DURATION].samples
        if sample.name.endswith("_bucket") and sample.exemplar is not None
    ]
    assert exemplars, "no exemplar on any bucket"
    trace_ids = {exemplar.labels["trace_id"] for exemplar in exemplars}
    assert all(len(trace_id) == 32 for trace_id in trace_ids)
    exported = wait_for(
        lambda: trace_ids & {span["traceId"] for span in read_spans(gunicorn_server.traces_path)}, timeout=10
    )
    assert exported, "exemplar trace ids were never exported as spans"


def test_every_log_line_of_a_request_carries_the_exported_span_ids(gunicorn_server: Gunicorn) -> None:
    """The app's own line and the access line of a request name the trace and span that was exported."""
    response = _get_without_keepalive(f"{gunicorn_server.url}/items/42")
    version, trace_id, span_id, flags = response.headers["traceresponse"].split("-")
    assert (version, flags) == ("00", "01")

    def lines_of_trace() -> list[dict]:
        return [line for line in gunicorn_server.log_lines() if line.get("trace_id") == trace_id]

    lines = wait_for(lambda: len(lines_of_trace()) >= 2 and lines_of_trace())
    events = {line["event"] for line in lines}
    assert {"item looked up", "request"} <= events
    for line in lines:
        assert line["span_id"] == span_id
        assert line["service.name"] == "shop"
        assert line["timestamp"].endswith("Z") and "T" in line["timestamp"]
        assert {"level", "logger"} <= line.keys()
    app_line = next(line for line in lines if line["event"] == "item looked up")
    assert app_line["api_key"] == "[REDACTED]"
    access = next(line for line in lines if line["event"] == "request")
    assert access["http.route"] == "/items/<int:item_id>"
    assert access["http.response.status_code"] == 200

    spans = wait_for(lambda: [s for s in read_spans(gunicorn_server.traces_path) if s["traceId"] == trace_id])
    assert [span["spanId"] for span in spans] == [span_id]
    span = spans[0]
    assert span["name"] == "GET /items/<int:item_id>"
    assert span["kind"] == 2  # SERVER
    assert span["attributes"]["http.route"] == "/items/<int:item_id>"
    assert span["attributes"]["url.path"] == "/items/42"
    assert span["resource"]["service.name"] == {"stringValue": "shop"}
    assert span["resource"]["service.version"] == {"stringValue": "1.2.3"}


def test_incoming_traceparent_becomes_the_parent_of_the_server_span(gunicorn_server: Gunicorn) -> None:
    """A caller's W3C trace context is continued: same trace id, the caller's span as parent."""
    trace_id = f"{random.getrandbits(128):032x}"
    parent_id = f"{random.getrandbits(64):016x}"
    response = requests.get(
        f"{gunicorn_server.url}/items/7",
        headers={"traceparent": f"00-{trace_id}-{parent_id}-01", "Connection": "close"},
        timeout=10,
    )
    assert response.headers["traceresponse"].split("-")[1] == trace_id
    spans = wait_for(lambda: [s for s in read_spans(gunicorn_server.traces_path) if s["traceId"] == trace_id])
    assert len(spans) == 1
    assert spans[0]["parentSpanId"] == parent_id


def test_malformed_trace_headers_start_a_new_trace(gunicorn_server: Gunicorn) -> None:
    """Garbage in traceparent or baggage is ignored: the request succeeds in a trace of its own."""
    for header in ("00-zz-01", "00-" + "0" * 32 + "-" + "0" * 16 + "-01", "x" * 5000):
        response = requests.get(
            f"{gunicorn_server.url}/items/3",
            headers={"traceparent": header, "baggage": "=;;,,%%%" * 100, "Connection": "close"},
            timeout=10,
        )
        assert response.status_code == 200
        trace_id = response.headers["traceresponse"].split("-")[1]
        assert trace_id != "0" * 32 and trace_id not in header


def test_unhandled_exception_gives_an_error_span_and_a_500_series(gunicorn_server: Gunicorn) -> None:
    """An exception in a view is recorded on the span (error.type, status ERROR) and counted as 500."""
    response = _get_without_keepalive(f"{gunicorn_server.url}/fail")
    assert response.status_code == 500
    trace_id = response.headers["traceresponse"].split("-")[1]
    spans = wait_for(lambda: [s for s in read_spans(gunicorn_server.traces_path) if s["traceId"] == trace_id])
    span = spans[0]
    assert span["attributes"]["error.type"] == "ValueError"
    assert span["attributes"]["http.response.status_code"] in ("500", 500)
    assert span["status"]["code"] == 2  # ERROR
    assert any(event["name"] == "exception" for event in span.get("events", []))
    assert _count(gunicorn_server.families(), "/fail", "500") >= 1


def test_exposition_passes_promtool_check_metrics(gunicorn_server: Gunicorn) -> None:
    """`promtool check metrics` finds nothing to complain about in the metrics endpoint."""
    _get_without_keepalive(f"{gunicorn_server.url}/items/1")
    result = subprocess.run(
        ["promtool", "check", "metrics"],
        input=gunicorn_server.scrape(openmetrics=False),
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == "" and result.stderr.strip() == ""


def test_every_exposed_family_is_in_the_catalog(gunicorn_server: Gunicorn) -> None:
    """The catalog is the contract: the endpoint exposes nothing it does not list."""
    _get_without_keepalive(f"{gunicorn_server.url}/items/1")
    exposed = set(gunicorn_server.families())
    catalog_families = {openmetrics_family_name(spec) for spec in CATALOG}
    assert exposed <= catalog_families, exposed - catalog_families


def test_ten_thousand_random_paths_add_no_series(gunicorn_server: Gunicorn) -> None:
    """Client-chosen paths and methods map to `<unmatched>` and `_OTHER`: the series set stays fixed."""
    session_count = 8
    methods = ["GET", "POST", "BREW", "PROPFIND"]
    for method in methods:  # the one series each (method, 404, <unmatched>) may legitimately add
        requests.request(method, f"{gunicorn_server.url}/no/such/path", timeout=10)
    before = _series(gunicorn_server.families())
    rng = random.Random(7)
    alphabet = string.ascii_letters + string.digits + "-_.~%"
    paths = ["/" + "".join(rng.choices(alphabet, k=rng.randint(1, 60))) for _ in range(10_000)]

    def hit(chunk: list[str]) -> Counter:
        statuses: Counter = Counter()
        with requests.Session() as session:
            for index, path in enumerate(chunk):
                response = session.request(methods[index % len(methods)], gunicorn_server.url + path, timeout=10)
                statuses[response.status_code // 100] += 1
        return statuses

    chunks = [paths[index::session_count] for index in range(session_count)]
    with ThreadPoolExecutor(session_count) as pool:
        statuses = sum(pool.map(hit, chunks), Counter())
    assert statuses[5] == 0 and sum(statuses.values()) == 10_000
    after = _series(gunicorn_server.families())
    assert after == before, sorted(after - before)[:10]


def test_excluded_urls_produce_no_span_and_no_metric(gunicorn_server: Gunicorn) -> None:
    """Health checks (excluded by default) stay out of the request metrics and traces."""
    response = _get_without_keepalive(f"{gunicorn_server.url}/healthz")
    assert response.status_code == 200
    assert "traceresponse" not in response.headers
    assert _count(gunicorn_server.families(), "/healthz") == 0


@pytest.mark.slow
def test_recycled_workers_lose_no_spans_and_no_counts(tmp_path) -> None:
    """With max_requests recycling, every request's span is exported and counted exactly once."""
    server = start_gunicorn(tmp_path, "--max-requests", "15")
    try:
        sent = 120
        for index in range(sent):
            assert _get_without_keepalive(f"{server.url}/items/{index + 1}").status_code == 200
        families = wait_for(lambda: server.families(), timeout=5)
        assert _count(families, "/items/<int:item_id>", "200") == sent
        metrics_dir = server.workdir / "metrics"
        # Exited workers are folded into archive files instead of leaving files of their own.
        master = psutil.Process(server.process.pid)

        def only_living_and_archive_files() -> bool:
            owners = {path.stem.rsplit("_", 1)[1] for path in metrics_dir.glob("*.db")}
            owners |= {path.stem.rsplit("_", 1)[1] for path in metrics_dir.glob("*.exm")}
            # Listed after the files, so a worker started in between counts as living.
            living = {str(master.pid)} | {str(child.pid) for child in master.children()}
            return "archive" in owners and owners - {"archive"} <= living

        assert wait_for(only_living_and_archive_files, timeout=10), sorted(path.name for path in metrics_dir.iterdir())
    finally:
        assert server.stop() == 0
    spans = [
        span
        for span in read_spans(server.traces_path)
        if span["attributes"].get("http.route") == "/items/<int:item_id>"
    ]
    assert len(spans) == sent
    assert len({span["spanId"] for span in spans}) == sent
    recycled = [line for line in server.log_lines() if "autorestarting worker" in str(line.get("event", "")).lower()]
    assert recycled, "workers were not recycled: the test proved nothing"
