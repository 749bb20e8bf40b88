"""Log lines leave the process as OpenTelemetry log records linked to their traces (OTEL_LOGS_EXPORTER)."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
import requests
from google.protobuf import json_format
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest

from spyglass.config import ConfigError, load_settings
from tests.conftest import REPO, clean_environment, free_port, start_gunicorn, wait_for
from tests.otlp_receiver import OtlpReceiver


@pytest.fixture
def receiver() -> Iterator[OtlpReceiver]:
    otlp = OtlpReceiver()
    yield otlp
    otlp.close()


def attributes_of(record: object) -> dict[str, object]:
    values = {}
    for kv in record.attributes:  # type: ignore[attr-defined]
        kind = kv.value.WhichOneof("value")
        values[kv.key] = getattr(kv.value, kind) if kind else None
    return values


def test_gunicorn_workers_send_their_log_lines_to_the_collector_linked_to_their_traces(
    tmp_path: Path, receiver: OtlpReceiver
) -> None:
    """With OTEL_EXPORTER_OTLP_ENDPOINT set, every worker's lines arrive as OTLP log records whose
    trace_id is the trace of the request they were logged in, with the service on the resource.
    """
    server = start_gunicorn(
        tmp_path,
        OTEL_EXPORTER_OTLP_ENDPOINT=f"http://127.0.0.1:{receiver.port}",
        OTEL_BLRP_SCHEDULE_DELAY="100",
    )
    try:
        with requests.Session() as session:
            for item in range(1, 21):
                assert session.get(f"{server.url}/items/{item}", timeout=10).status_code == 200
        access = wait_for(
            lambda: [r for r in receiver.log_records() if r[2].body.string_value == "request"] or None, timeout=15
        )
        wait_for(lambda: len([r for r in receiver.log_records() if r[2].body.string_value == "request"]) >= 20)
        wait_for(lambda: len(receiver.span_trace_ids()) >= 20, timeout=15)
    finally:
        server.stop()
    access = [r for r in receiver.log_records() if r[2].body.string_value == "request"]
    stdout_lines = {line.get("trace_id") for line in server.log_lines() if line.get("event") == "request"}
    assert len(access) == 20
    span_traces = receiver.span_trace_ids()
    for resource, scope, record in access:
        assert resource["service.name"] == "shop"
        assert resource["service.version"] == "1.2.3"
        assert scope == "spyglass.access"
        assert record.severity_text == "INFO" and record.severity_number == 9
        attributes = attributes_of(record)
        assert attributes["http.route"] == "/items/<int:item_id>"
        assert attributes["http.response.status_code"] == 200
        assert len(record.trace_id) == 16 and len(record.span_id) == 8
        assert record.trace_id.hex() in span_traces, "the log record's trace was exported too"
        assert record.trace_id.hex() in stdout_lines, "the record carries the stdout line's trace_id"
        assert record.time_unix_nano > 0


SCRIPT = textwrap.dedent(
    """
    import json, os, sys
    import spyglass
    from prometheus_client import REGISTRY

    telemetry = spyglass.init()
    log = spyglass.get_logger("checkout")
    tracer = telemetry.tracer
    with tracer.start_as_current_span("checkout") as span:
        log.warning("card declined", order_id=42, amount=12.5, tags=["a", "b"], details={"retry": True})
        try:
            1 / 0
        except ZeroDivisionError:
            log.exception("charge failed")
    for index in range(int(os.environ.get("EXTRA_LINES", "0"))):
        log.info("filler", index=index)
    telemetry.flush()
    values = {
        f"{name}{{{kind}}}": REGISTRY.get_sample_value(name, {"error_type": kind}) or 0
        for name, kind in (("otel_sdk_processor_log_processed_total", "queue_full"),
                           ("otel_sdk_exporter_log_exported_total", "export_failed"),
                           ("otel_sdk_exporter_log_exported_total", ""))
    }
    spyglass.shutdown()
    print(json.dumps(values), file=sys.stderr)
    """
)


def run_script(tmp_path: Path, timeout: float = 30, **env: str) -> subprocess.CompletedProcess:
    script = tmp_path / "app.py"
    script.write_text(SCRIPT)
    environment = clean_environment(
        OTEL_SERVICE_NAME="checkout", SPYGLASS_METRICS_PORT="0", PYTHONPATH=str(REPO), OTEL_TRACES_EXPORTER="none"
    )
    environment.update(env)
    return subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, env=environment, capture_output=True, timeout=timeout, check=True
    )


def hex_ids_as_base64(node: object) -> object:
    """OTLP/JSON writes ids in hex; the protobuf JSON mapping reads bytes as base64."""
    if isinstance(node, dict):
        return {
            key: base64.b64encode(bytes.fromhex(value)).decode()
            if key in ("traceId", "spanId")
            else hex_ids_as_base64(value)
            for key, value in node.items()
        }
    if isinstance(node, list):
        return [hex_ids_as_base64(item) for item in node]
    return node


def test_the_json_file_exporter_writes_otlp_log_requests_the_collector_can_read(tmp_path: Path) -> None:
    """OTEL_LOGS_EXPORTER=otlp_json_file appends ExportLogsServiceRequest lines (the otlpjsonfile
    receiver's format): severity, body, attributes, exception stack and the stdout line's trace_id.
    """
    logs_file = tmp_path / "otlp" / "logs.jsonl"
    result = run_script(tmp_path, OTEL_LOGS_EXPORTER="otlp_json_file", SPYGLASS_LOGS_FILE=str(logs_file))
    stdout = [json.loads(line) for line in result.stdout.decode().splitlines()]
    declined = next(line for line in stdout if line["event"] == "card declined")
    records = []
    for raw in logs_file.read_text().splitlines():
        request = json_format.ParseDict(hex_ids_as_base64(json.loads(raw)), ExportLogsServiceRequest())
        for resource_logs in request.resource_logs:
            service = {kv.key: kv.value.string_value for kv in resource_logs.resource.attributes}["service.name"]
            for scope_logs in resource_logs.scope_logs:
                records.extend((service, scope_logs.scope.name, record) for record in scope_logs.log_records)
    by_body = {record.body.string_value: (service, scope, record) for service, scope, record in records}
    service, scope, record = by_body["card declined"]
    assert (service, scope) == ("checkout", "checkout")
    assert record.severity_text == "WARNING" and record.severity_number == 13
    assert record.trace_id.hex() == declined["trace_id"] and record.span_id.hex() == declined["span_id"]
    attributes = attributes_of(record)
    assert attributes["order_id"] == 42 and attributes["amount"] == 12.5
    assert list(attributes["tags"].values[i].string_value for i in range(2)) == ["a", "b"]
    assert json.loads(attributes["details"]) == {"retry": True}
    assert "service.name" not in attributes and "timestamp" not in attributes
    failed = attributes_of(by_body["charge failed"][2])
    assert "ZeroDivisionError" in failed["exception.stacktrace"]
    assert by_body["charge failed"][2].severity_number == 17
    counts = json.loads(result.stderr.decode().splitlines()[-1])
    assert counts["otel_sdk_exporter_log_exported_total{}"] == len(records) == 2


def test_a_collector_that_is_down_costs_log_records_not_lines_or_exit_time(tmp_path: Path) -> None:
    """With nothing listening at the endpoint, every line still reaches stdout, the process exits
    promptly, and the records that could not be delivered are counted (dropped or failed).
    """
    started = time.monotonic()
    result = run_script(
        tmp_path,
        timeout=60,
        EXTRA_LINES="3000",
        OTEL_LOGS_EXPORTER="otlp",
        OTEL_EXPORTER_OTLP_ENDPOINT=f"http://127.0.0.1:{free_port()}",
        OTEL_EXPORTER_OTLP_TIMEOUT="1000",
        OTEL_BLRP_MAX_QUEUE_SIZE="64",
        OTEL_BLRP_MAX_EXPORT_BATCH_SIZE="32",
    )
    elapsed = time.monotonic() - started
    lines = result.stdout.decode().splitlines()
    assert sum(1 for line in lines if json.loads(line)["event"] == "filler") == 3000
    counts = json.loads(result.stderr.decode().splitlines()[-1])
    dropped = counts["otel_sdk_processor_log_processed_total{queue_full}"]
    failed = counts["otel_sdk_exporter_log_exported_total{export_failed}"]
    assert dropped > 0 and failed > 0, counts
    assert dropped + failed >= 3000 - 64, counts  # at most one queue's worth may still be waiting at exit
    assert counts["otel_sdk_exporter_log_exported_total{}"] == 0
    assert elapsed < 20, f"exit took {elapsed:.1f}s with the collector down"


FORK_SCRIPT = textwrap.dedent(
    """
    import os
    import spyglass

    spyglass.init()
    log = spyglass.get_logger("forks")
    log.info("before fork")
    pid = os.fork()
    if pid == 0:
        log.info("in child")
        spyglass.shutdown()
        os._exit(0)
    os.waitpid(pid, 0)
    log.info("in parent")
    spyglass.shutdown()
    """
)


def logs_file_bodies(path: Path) -> list[str]:
    """The body of every record in an OTLP JSON logs file."""
    return [
        record["body"]["stringValue"]
        for line in path.read_text().splitlines()
        for resource_logs in json.loads(line)["resourceLogs"]
        for scope_logs in resource_logs["scopeLogs"]
        for record in scope_logs["logRecords"]
    ]


def run_exporting_to_a_file(tmp_path: Path, source: str, **extra_env: str) -> tuple[list[str], list[str]]:
    """Run ``source`` with its log lines exported to an OTLP JSON file: the events on its stdout
    and the bodies of the records in the file.
    """
    script = tmp_path / "script.py"
    script.write_text(source)
    logs_file = tmp_path / "logs.jsonl"
    env = clean_environment(
        OTEL_SERVICE_NAME="forks",
        SPYGLASS_METRICS_PORT="0",
        PYTHONPATH=str(REPO),
        OTEL_TRACES_EXPORTER="none",
        OTEL_LOGS_EXPORTER="otlp_json_file",
        SPYGLASS_LOGS_FILE=str(logs_file),
        **extra_env,
    )
    result = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, env=env, check=True, timeout=30, capture_output=True
    )
    events = [json.loads(line)["event"] for line in result.stdout.decode().splitlines()]
    return events, logs_file_bodies(logs_file)


def test_a_forked_child_exports_its_own_lines_and_never_its_parents(tmp_path: Path) -> None:
    """Lines queued before a fork (a prefork worker's start) are exported once, by the parent."""
    _, bodies = run_exporting_to_a_file(
        tmp_path, FORK_SCRIPT, OTEL_BLRP_SCHEDULE_DELAY="60000", SPYGLASS_LOG_FLUSH_INTERVAL="0"
    )
    assert sorted(bodies) == ["before fork", "in child", "in parent"]


POOL_SCRIPT = textwrap.dedent(
    """
    import os
    import spyglass
    from spyglass import runtime

    runtime.init(role="master")  # a Celery worker's main process, or a gunicorn master
    log = spyglass.get_logger("tasks")  # bound at import, in the master, as a module does
    log.info("in parent")
    pid = os.fork()
    if pid == 0:
        runtime.mark_worker()  # what gunicorn's post_fork and Celery's worker_process_init do
        runtime.init(role="worker")
        log.info("in child")
        spyglass.shutdown()
        os._exit(0)
    os.waitpid(pid, 0)
    spyglass.shutdown()
    """
)


def test_a_logger_bound_before_a_worker_sets_up_its_pipeline_is_exported_by_it(tmp_path: Path) -> None:
    """A module-level logger made in the master writes, in a pool process that set up its own
    pipeline, through that pipeline: its lines are exported, not left to the master's retired one.
    """
    events, bodies = run_exporting_to_a_file(tmp_path, POOL_SCRIPT)
    assert events.count("in child") == 1 and events.count("in parent") == 1, events
    assert sorted(bodies) == ["in child", "in parent"]


def test_a_gunicorn_worker_exports_the_lines_it_logged_before_its_own_pipeline_once(tmp_path: Path) -> None:
    """The worker logs gunicorn's "Booting worker" before spyglass sets the worker's pipeline up:
    that line is exported once, like the lines the worker logs afterwards.
    """
    logs_file = tmp_path / "logs.jsonl"
    server = start_gunicorn(tmp_path / "server", OTEL_LOGS_EXPORTER="otlp_json_file", SPYGLASS_LOGS_FILE=str(logs_file))
    try:
        with requests.Session() as session:
            assert session.get(f"{server.url}/items/1", timeout=10).status_code == 200
    finally:
        assert server.stop() == 0
    bodies = logs_file_bodies(logs_file)
    booted = [body for body in bodies if body.startswith("Booting worker with pid")]
    assert len(booted) == 2 and len(set(booted)) == 2, booted
    assert bodies.count("item looked up") == 1, bodies


def test_a_gunicorn_worker_warns_once_and_at_once_about_a_logs_file_it_cannot_write(tmp_path: Path) -> None:
    """A logs file that cannot be written is reported once per process, while it serves: not again,
    with the time it booted, when it exits (its master's pipeline, which it held until its own was
    set up, shares what the worker knows of the file).
    """
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    logs_file = blocker / "logs.jsonl"
    server = start_gunicorn(
        tmp_path / "server",
        OTEL_LOGS_EXPORTER="otlp_json_file",
        SPYGLASS_LOGS_FILE=str(logs_file),
        OTEL_BLRP_SCHEDULE_DELAY="100",
    )

    def warnings() -> list[dict]:
        return [line for line in server.log_lines() if str(line.get("event", "")).startswith("cannot write the logs")]

    try:
        with requests.Session() as session:
            for item in range(1, 11):
                assert session.get(f"{server.url}/items/{item}", timeout=10).status_code == 200
        workers = {child.pid for child in psutil.Process(server.process.pid).children()}
        assert wait_for(lambda: {line["process.pid"] for line in warnings()} >= workers | {server.process.pid})
        time.sleep(0.5)  # a second warning (from the retired pipeline) came within a batch interval
        while_serving = warnings()
    finally:
        assert server.stop() == 0
    assert sorted(line["process.pid"] for line in while_serving) == sorted(workers | {server.process.pid})
    assert warnings() == while_serving, "warned again on the way out"
    for line in while_serving:
        assert line["path"] == str(logs_file) and line["error.type"] == "EEXIST", line


def test_log_export_settings_follow_the_otel_variables() -> None:
    """Lines go to a collector when an OTLP endpoint is named, to stdout only otherwise; a typo is an error."""
    assert load_settings({}).logs_exporters == ()
    named = load_settings({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"})
    assert named.logs_exporters == ("otlp",)
    assert named.otlp_logs_endpoint == "http://collector:4318/v1/logs"
    only_logs = load_settings({"OTEL_EXPORTER_OTLP_LOGS_ENDPOINT": "http://loki:3100/otlp/v1/logs"})
    assert only_logs.otlp_logs_endpoint == "http://loki:3100/otlp/v1/logs" and only_logs.logs_exporters == ("otlp",)
    assert load_settings({"OTEL_LOGS_EXPORTER": "console"}).logs_exporters == ()
    assert (
        load_settings({"OTEL_LOGS_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318"}).logs_exporters
        == ()
    )
    both = load_settings({"OTEL_LOGS_EXPORTER": "otlp,otlp_json_file"})
    assert both.logs_exporters == ("otlp", "otlp_json_file")
    with pytest.raises(ConfigError, match="OTEL_LOGS_EXPORTER"):
        load_settings({"OTEL_LOGS_EXPORTER": "loki"})
    with pytest.raises(ConfigError, match="OTEL_BLRP_MAX_EXPORT_BATCH_SIZE"):
        load_settings({"OTEL_BLRP_MAX_QUEUE_SIZE": "10", "OTEL_BLRP_MAX_EXPORT_BATCH_SIZE": "20"})
    with pytest.raises(ConfigError, match="OTEL_EXPORTER_OTLP_LOGS_PROTOCOL"):
        load_settings({"OTEL_EXPORTER_OTLP_LOGS_PROTOCOL": "grpc"})


class CollectingExporter:
    """An exporter that keeps the bodies it is given (the real ones are tested above)."""

    def __init__(self) -> None:
        self.bodies: list[str] = []

    def export(self, batch: list) -> object:
        from opentelemetry.sdk._logs.export import LogRecordExportResult

        self.bodies.extend(record.log_record.body for record in batch)
        return LogRecordExportResult.SUCCESS

    def shutdown(self) -> None:
        pass


class Tally:
    """Counts what the export queue reports."""

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}

    def dropped(self, count: int, error_type: str) -> None:
        self.counts[error_type] = self.counts.get(error_type, 0) + count

    def exported(self, count: int, error_type: str = "") -> None:
        self.counts[error_type or "ok"] = self.counts.get(error_type or "ok", 0) + count


def test_flush_returns_only_once_every_line_offered_before_it_is_exported() -> None:
    """flush() (run at exit and when a gunicorn worker exits) never returns while a line offered
    before it is still queued, however the export thread's cycle falls.
    """
    from opentelemetry.sdk.resources import Resource

    from spyglass.log_export import LogLineExporter

    collected, tally = CollectingExporter(), Tally()
    exporter = LogLineExporter(collected, Resource.create({}), tally, schedule_delay_s=0.001, exit_timeout_s=5)
    for round_ in range(300):
        exporter.offer([f'{{"event":"line {round_}"}}'.encode()])
        assert exporter.flush() is True
        assert collected.bodies[-1] == f"line {round_}", round_
    exporter.shutdown()
    assert len(collected.bodies) == 300 and tally.counts == {"ok": 300}
