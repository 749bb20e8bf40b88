"""OTLP/HTTP exporters whose batches are encoded by :mod:`spyglass.otlp_proto`.

They are the OpenTelemetry SDK's own ``OTLPSpanExporter`` and ``OTLPLogExporter`` (same
variables, endpoint, headers, compression, timeout, retries, size limit and internal metrics);
only the step that turns a batch into protobuf bytes is replaced, the part of an export that
costs the most CPU (:mod:`spyglass.otlp_proto` writes the bytes the SDK's message objects would
serialise to, several times faster). Should a later SDK release no longer have the internals
that step sits between, the exporters fall back to the SDK's own ``export`` unchanged.

Batches are POSTed through the SDK's urllib3 transport rather than its default, a
``requests.Session``, which reads the proxy variables and ``~/.netrc`` again on every request
(about 0.4 ms of CPU per batch of 512, a fifth to a third of what encoding them costs). What the session
would have read from the environment is read once, when the exporter is built: the transport is
kept as the SDK built it when a proxy applies to the endpoint, when ``.netrc`` holds credentials
for its host, when the CA bundle is a directory, or when a credential provider
(``OTEL_PYTHON_EXPORTER_OTLP_HTTP_*CREDENTIAL_PROVIDER``) or a ``session`` is given.
Certificates are verified against the bundle ``requests`` would use (``OTEL_EXPORTER_OTLP_*CERTIFICATE``,
else ``REQUESTS_CA_BUNDLE`` or ``CURL_CA_BUNDLE``, else certifi's) with the same client certificate.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from typing import Any

from opentelemetry.exporter.otlp.proto.http._log_exporter import OTLPLogExporter
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk._logs.export import LogRecordExportResult
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExportResult

from spyglass.otlp_proto import encode_log_lines_request, encode_spans_request

__all__ = ["OtlpProtoLogExporter", "OtlpProtoSpanExporter"]

_logger = logging.getLogger(__name__)
_SDK_INTERNALS = ("_shutdown", "_metrics", "_client", "_max_request_size")


def _has_sdk_internals(exporter: object) -> bool:
    return all(hasattr(exporter, name) for name in _SDK_INTERNALS)


def _session_reads_environment(endpoint: str) -> bool:
    """Whether a ``requests.Session`` would send to ``endpoint`` differently because of the environment."""
    import requests.utils

    for name in os.environ:
        if name.startswith("OTEL_PYTHON_EXPORTER_OTLP_HTTP_") and name.endswith("CREDENTIAL_PROVIDER"):
            return True
    return bool(requests.utils.get_environ_proxies(endpoint)) or requests.utils.get_netrc_auth(endpoint) is not None


def _certifi_bundle() -> str:
    import certifi

    return certifi.where()


def _use_urllib3_transport(exporter: Any, session_given: bool) -> None:
    """Replace the exporter's default ``requests`` transport by the SDK's urllib3 one, when they send alike.

    Leaves the exporter as it is when they would not (see the module's docstring), or when this
    SDK release builds its transport differently.
    """
    try:
        from opentelemetry.exporter.http.transport._requests import RequestsHTTPTransport
        from opentelemetry.exporter.http.transport._urllib3 import Urllib3HTTPTransport
    except ImportError:  # pragma: no cover - an SDK release without these transports
        return
    client = getattr(exporter, "_client", None)
    current = getattr(client, "_transport", None)
    session = getattr(current, "_session", None)
    if session_given or type(current) is not RequestsHTTPTransport or session is None:
        return
    if _session_reads_environment(exporter._endpoint):
        return
    verify = session.verify
    if verify is True:  # what requests verifies against
        verify = os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE") or _certifi_bundle()
    if isinstance(verify, str) and os.path.isdir(verify):  # requests reads a directory of certificates
        return
    client._transport = Urllib3HTTPTransport(verify=verify, cert=session.cert)
    current.close()


def _send(exporter: Any, count: int, encode: Callable[[], bytes], signal: str) -> bool:
    """Encode a batch of ``count`` items and POST it the way the SDK's exporter does; True on success.

    The SDK's internal metrics (``otel.sdk.exporter.*``, when enabled) see the same operation.
    """
    if exporter._shutdown:
        _logger.warning("Exporter already shutdown, ignoring batch")
        return False
    with exporter._metrics.export_operation(count) as result:
        try:
            payload = encode()
        except Exception as error:  # an encoding bug loses this batch, never the export thread
            _logger.error("Failed to encode %s batch: %s", signal, error)
            result.error = error
            return False
        limit = exporter._max_request_size
        if 0 < limit < len(payload):
            _logger.warning(
                "Dropping %s batch: serialized size %d bytes exceeds max_request_size %d bytes.",
                signal,
                len(payload),
                limit,
            )
            result.error = ValueError(f"serialized {signal} request of {len(payload)} bytes exceeds {limit} bytes")
            return False
        outcome = exporter._client.export(payload)
        if not outcome.success:
            result.error = outcome.error
            if outcome.status_code is not None:
                result.error_attrs = {"http.response.status_code": outcome.status_code}
            return False
    return True


class OtlpProtoSpanExporter(OTLPSpanExporter):
    """``OTLPSpanExporter`` encoding its batches with :func:`spyglass.otlp_proto.encode_spans_request`."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._direct = _has_sdk_internals(self)
        if self._direct:
            _use_urllib3_transport(self, kwargs.get("session") is not None or len(args) > 7)

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        """Encode and send one batch; FAILURE (never an exception) when it could not be delivered."""
        if not self._direct:  # pragma: no cover - an SDK release without the internals used here
            return super().export(spans)
        delivered = _send(self, len(spans), lambda: encode_spans_request(spans), "span")
        return SpanExportResult.SUCCESS if delivered else SpanExportResult.FAILURE


class OtlpProtoLogExporter(OTLPLogExporter):
    """``OTLPLogExporter`` that also exports spyglass's rendered JSON lines without record objects.

    :class:`spyglass.log_export.LogLineExporter` calls :meth:`export_lines`, which encodes each line
    straight to the protobuf bytes of its log record
    (:func:`spyglass.otlp_proto.encode_log_lines_request`); ``export`` of SDK log records is the
    SDK's own.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._direct = _has_sdk_internals(self)
        if self._direct:
            _use_urllib3_transport(self, kwargs.get("session") is not None or len(args) > 7)

    def export_lines(self, lines: Sequence[bytes], resource: Resource) -> LogRecordExportResult:
        """Encode and send one batch of lines; FAILURE (never an exception) when it could not be delivered."""
        if not self._direct:  # pragma: no cover - an SDK release without the internals used here
            from spyglass.log_export import line_to_log_record

            return super().export([line_to_log_record(line, resource) for line in lines])
        delivered = _send(self, len(lines), lambda: encode_log_lines_request(lines, resource), "logs")
        return LogRecordExportResult.SUCCESS if delivered else LogRecordExportResult.FAILURE
