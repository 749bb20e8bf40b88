"""How spyglass's OTLP/HTTP exporters reach the collector: plain HTTP, proxies, TLS and client certificates.

The exporters POST through the SDK's urllib3 transport instead of a ``requests.Session`` (which
reads the environment again on every batch); these tests hold that nothing a user configures is
lost on the way: proxy variables, ``OTEL_EXPORTER_OTLP_*CERTIFICATE`` and client certificates.
"""

from __future__ import annotations

import base64
import ssl
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import trustme
from opentelemetry.exporter.http.transport._requests import RequestsHTTPTransport
from opentelemetry.exporter.http.transport._urllib3 import Urllib3HTTPTransport
from opentelemetry.sdk._logs.export import LogRecordExportResult
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult

from spyglass.otlp_http import OtlpProtoLogExporter, OtlpProtoSpanExporter
from tests.otlp_receiver import OtlpReceiver

_PROXY_AND_TLS_VARIABLES = (
    "http_proxy",
    "https_proxy",
    "all_proxy",
    "no_proxy",
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "ALL_PROXY",
    "NO_PROXY",
    "OTEL_EXPORTER_OTLP_CERTIFICATE",
    "OTEL_EXPORTER_OTLP_TRACES_CERTIFICATE",
    "OTEL_EXPORTER_OTLP_CLIENT_KEY",
    "OTEL_EXPORTER_OTLP_TRACES_CLIENT_KEY",
    "OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE",
    "OTEL_EXPORTER_OTLP_TRACES_CLIENT_CERTIFICATE",
)


@pytest.fixture(autouse=True)
def _no_proxy_or_certificate_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in _PROXY_AND_TLS_VARIABLES:
        monkeypatch.delenv(name, raising=False)


def _spans(count: int) -> list[ReadableSpan]:
    """Ended SDK spans (the exporter is called with them directly)."""
    kept: list[ReadableSpan] = []

    class _Keep(SpanExporter):
        def export(self, spans: object) -> SpanExportResult:
            kept.extend(spans)  # type: ignore[arg-type]
            return SpanExportResult.SUCCESS

    provider = TracerProvider(resource=Resource.create({"service.name": "shop"}))
    provider.add_span_processor(SimpleSpanProcessor(_Keep()))
    tracer = provider.get_tracer("tests")
    for number in range(count):
        tracer.start_span(f"span {number}").end()
    provider.shutdown()
    return kept


def _trace_ids(spans: list[ReadableSpan]) -> set[str]:
    return {f"{span.get_span_context().trace_id:032x}" for span in spans}


@pytest.fixture
def receiver() -> Iterator[OtlpReceiver]:
    otlp = OtlpReceiver()
    yield otlp
    otlp.close()


def test_spans_and_log_lines_are_posted_over_urllib3_by_default(receiver: OtlpReceiver) -> None:
    """With nothing in the environment that a requests session would read, both exporters send
    through the SDK's urllib3 transport, and the collector receives every span and record.
    """
    spans = _spans(3)
    span_exporter = OtlpProtoSpanExporter(endpoint=f"http://127.0.0.1:{receiver.port}/v1/traces", timeout=5)
    log_exporter = OtlpProtoLogExporter(endpoint=f"http://127.0.0.1:{receiver.port}/v1/logs", timeout=5)
    try:
        assert type(span_exporter._client._transport) is Urllib3HTTPTransport
        assert type(log_exporter._client._transport) is Urllib3HTTPTransport
        assert span_exporter.export(spans) is SpanExportResult.SUCCESS
        line = b'{"event":"order placed","level":"info","logger":"shop","timestamp":"2026-11-24T10:00:00.000001Z"}\n'
        resource = Resource.create({"service.name": "shop"})
        assert log_exporter.export_lines([line], resource) is LogRecordExportResult.SUCCESS
    finally:
        span_exporter.shutdown()
        log_exporter.shutdown()
    assert receiver.span_trace_ids() == _trace_ids(spans)
    assert [record.body.string_value for _resource, _scope, record in receiver.log_records()] == ["order placed"]


def test_an_endpoint_that_the_collector_does_not_answer_is_a_failed_export_not_an_exception() -> None:
    """A refused connection makes the export fail (FAILURE, counted as lost), as with the SDK's own client."""
    from tests.conftest import free_port

    exporter = OtlpProtoSpanExporter(endpoint=f"http://127.0.0.1:{free_port()}/v1/traces", timeout=1)
    try:
        assert exporter.export(_spans(1)) is SpanExportResult.FAILURE
    finally:
        exporter.shutdown()


class _Recorder:
    """An HTTP server answering every POST with 200 that keeps the request lines and headers
    (a forward proxy that answers for the collector, or a collector that shows what it was sent).
    """

    def __init__(self) -> None:
        self.request_lines: list[str] = []
        self.authorizations: list[str | None] = []
        seen, authorizations = self.request_lines, self.authorizations

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                self.rfile.read(int(self.headers["Content-Length"]))
                seen.append(self.requestline)
                authorizations.append(self.headers.get("Authorization"))
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_a_proxy_named_in_the_environment_carries_the_export(monkeypatch: pytest.MonkeyPatch) -> None:
    """``http_proxy`` applies to OTLP export as it does with the SDK's own exporter: the batch goes
    to the proxy (here the only way to reach a collector whose name does not resolve), and
    ``no_proxy`` naming the collector sends it direct again.
    """
    proxy = _Recorder()
    monkeypatch.setenv("http_proxy", f"http://127.0.0.1:{proxy.port}")
    endpoint = "http://collector.invalid:4318/v1/traces"
    exporter = OtlpProtoSpanExporter(endpoint=endpoint, timeout=5)
    try:
        assert type(exporter._client._transport) is RequestsHTTPTransport
        assert exporter.export(_spans(2)) is SpanExportResult.SUCCESS
    finally:
        exporter.shutdown()
        proxy.close()
    assert proxy.request_lines == [f"POST {endpoint} HTTP/1.1"]

    monkeypatch.setenv("no_proxy", "collector.invalid")
    direct = OtlpProtoSpanExporter(endpoint=endpoint, timeout=5)
    try:
        assert type(direct._client._transport) is Urllib3HTTPTransport
    finally:
        direct.shutdown()


@pytest.fixture(scope="module")
def authority() -> trustme.CA:
    return trustme.CA()


def _tls_receiver(authority: trustme.CA, client_certificates: bool = False) -> OtlpReceiver:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    authority.issue_cert("127.0.0.1").configure_cert(context)
    if client_certificates:
        authority.configure_trust(context)
        context.verify_mode = ssl.CERT_REQUIRED
    return OtlpReceiver(tls=context)


def test_an_https_collector_is_trusted_through_the_certificate_variable(
    authority: trustme.CA, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A collector whose certificate comes from a private CA receives the batch when
    ``OTEL_EXPORTER_OTLP_TRACES_CERTIFICATE`` names that CA, and is refused (a failed export,
    nothing delivered) when it does not: certificates are verified.
    """
    receiver = _tls_receiver(authority)
    endpoint = f"https://127.0.0.1:{receiver.port}/v1/traces"
    spans = _spans(2)
    try:
        untrusting = OtlpProtoSpanExporter(endpoint=endpoint, timeout=2)
        try:
            assert untrusting.export(spans) is SpanExportResult.FAILURE
        finally:
            untrusting.shutdown()
        assert receiver.span_trace_ids() == set()

        ca_file = tmp_path / "ca.pem"
        authority.cert_pem.write_to_path(str(ca_file))
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_CERTIFICATE", str(ca_file))
        trusting = OtlpProtoSpanExporter(endpoint=endpoint, timeout=5)
        try:
            assert type(trusting._client._transport) is Urllib3HTTPTransport
            assert trusting.export(spans) is SpanExportResult.SUCCESS
        finally:
            trusting.shutdown()
        assert receiver.span_trace_ids() == _trace_ids(spans)
    finally:
        receiver.close()


def test_a_client_certificate_from_the_environment_is_presented_to_the_collector(
    authority: trustme.CA, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With ``OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE`` and ``OTEL_EXPORTER_OTLP_CLIENT_KEY`` (mutual
    TLS), a collector that requires a client certificate accepts the batch.
    """
    receiver = _tls_receiver(authority, client_certificates=True)
    ca_file, cert_file, key_file = tmp_path / "ca.pem", tmp_path / "client.pem", tmp_path / "client.key"
    authority.cert_pem.write_to_path(str(ca_file))
    client = authority.issue_cert("exporter@shop.example")
    client.cert_chain_pems[0].write_to_path(str(cert_file))
    client.private_key_pem.write_to_path(str(key_file))
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_CERTIFICATE", str(ca_file))
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE", str(cert_file))
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_CLIENT_KEY", str(key_file))
    spans = _spans(1)
    exporter = OtlpProtoSpanExporter(endpoint=f"https://127.0.0.1:{receiver.port}/v1/traces", timeout=5)
    try:
        assert exporter.export(spans) is SpanExportResult.SUCCESS
    finally:
        exporter.shutdown()
        receiver.close()
    assert receiver.span_trace_ids() == _trace_ids(spans)


def test_credentials_in_netrc_for_the_collector_are_sent(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A ``.netrc`` entry for the collector's host gives the export its basic-auth credentials,
    as the SDK's requests session does.
    """
    collector = _Recorder()
    netrc = tmp_path / "netrc"
    netrc.write_text("machine 127.0.0.1 login shop password s3cret\n")
    netrc.chmod(0o600)
    monkeypatch.setenv("NETRC", str(netrc))
    exporter = OtlpProtoSpanExporter(endpoint=f"http://127.0.0.1:{collector.port}/v1/traces", timeout=5)
    try:
        assert exporter.export(_spans(1)) is SpanExportResult.SUCCESS
    finally:
        exporter.shutdown()
        collector.close()
    assert collector.authorizations == ["Basic " + base64.b64encode(b"shop:s3cret").decode()]
