"""The process-wide telemetry state: set up once, shared by every integration, shut down cleanly.

A process plays one of three roles:

``standalone``
    One process serves the application and its own metrics endpoint.
``master``
    A pre-forking server's parent (gunicorn arbiter, Celery main process): it owns the
    multi-process metrics directory and serves the endpoint that sums all workers.
``worker``
    A forked child of a master: it records telemetry but serves no endpoint.

A master whose work runs in its own process (a Celery worker with the solo or threads pool) is
made a recorder as well by :func:`record_in_master`. A master that only reports on its workers
(a Celery prefork main process, when a pool process dies) gets spans through
:meth:`Telemetry.master_tracer`, on a tracer provider of its own that its forked workers drop.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from dataclasses import dataclass, field, replace
from typing import Any

from opentelemetry import propagate, trace
from opentelemetry.propagators.textmap import TextMapPropagator
from opentelemetry.sdk.trace import TracerProvider
from prometheus_client import REGISTRY, CollectorRegistry, PlatformCollector

from spyglass import __version__
from spyglass.config import LOG_LEVELS, Settings, load_settings
from spyglass.light_span import LightSpanStarter
from spyglass.logs import attach_log_metrics, configure_logging, flush_logs, reset_logging
from spyglass.metrics import multiprocess
from spyglass.metrics.collectors import MultiProcessExemplarCollector, ProcessTreeCollector, ResourceInfoCollector
from spyglass.metrics.exemplars import ExemplarFile
from spyglass.metrics.instruments import (
    CeleryMetrics,
    DatabaseMetrics,
    HttpServerMetrics,
    LogPipelineMetrics,
    SpanPipelineMetrics,
)
from spyglass.metrics.server import MetricsServer, start_metrics_server
from spyglass.redaction import Redactor
from spyglass.sampling import build_sampling_rule
from spyglass.tracing import build_propagator, build_tracer_provider

__all__ = ["ROLES", "Telemetry", "current", "init", "mark_worker", "record_in_master", "set_log_level", "shutdown"]

ROLES = ("standalone", "master", "worker")
_logger = logging.getLogger("spyglass")
_lock = threading.RLock()
_state: Telemetry | None = None
_role_override: str | None = None


@dataclass
class Telemetry:
    """Everything the integrations need, built once per process by :func:`init`."""

    settings: Settings
    role: str
    tracer: trace.Tracer | None
    tracer_provider: TracerProvider | None
    propagator: TextMapPropagator
    http_metrics: HttpServerMetrics | None
    span_metrics: SpanPipelineMetrics | None
    redactor: Redactor
    metrics_dir: str | None = None
    server_spans: LightSpanStarter | None = None
    """Starts the SERVER spans of requests (scope ``spyglass``)."""
    metrics_server: MetricsServer | None = None
    exemplar_file: ExemplarFile | None = None
    _extra_collectors: list = field(default_factory=list)
    _celery_metrics: CeleryMetrics | None = None
    _db_metrics: DatabaseMetrics | None = None
    _log_metrics: LogPipelineMetrics | None = None
    _serving_registry: CollectorRegistry | None = None
    _served_collectors: list = field(default_factory=list)
    _compactor: multiprocess.ExitedProcessCompactor | None = None
    _master_provider: TracerProvider | None = None
    _span_starters: dict = field(default_factory=dict)
    pid: int = field(default_factory=os.getpid)
    """The process that set this state up (a forked child inherits its parent's)."""

    @property
    def disabled(self) -> bool:
        """``SPYGLASS_DISABLED`` is set: integrations leave the application untouched."""
        return self.settings.disabled

    @property
    def metrics_port(self) -> int | None:
        """The port the metrics endpoint listens on in this process, if it serves one."""
        return self.metrics_server.port if self.metrics_server else None

    def celery_metrics(self) -> CeleryMetrics | None:
        """The Celery task instruments, created on first use (``None`` when spyglass is disabled)."""
        if self._celery_metrics is not None or self.disabled:
            return self._celery_metrics
        with _lock:
            if self._celery_metrics is None:
                self._celery_metrics = CeleryMetrics(REGISTRY, self.exemplar_file)
            return self._celery_metrics

    def db_metrics(self) -> DatabaseMetrics | None:
        """The SQL instruments, created on first use (``None`` when spyglass is disabled)."""
        if self._db_metrics is not None or self.disabled:
            return self._db_metrics
        with _lock:
            if self._db_metrics is None:
                self._db_metrics = DatabaseMetrics(REGISTRY, self.exemplar_file)
            return self._db_metrics

    def serve_collector(self, collector: Any) -> bool:
        """Add a collector to what this process's metrics endpoint serves; False if it serves none."""
        with _lock:
            if self._serving_registry is None:
                return False
            self._serving_registry.register(collector)
            self._served_collectors.append(collector)
            return True

    def span_starter(self, name: str, version: str = "", schema_url: str | None = None) -> LightSpanStarter | None:
        """Starts light spans under the instrumentation scope ``name`` (``None`` when this process traces nothing)."""
        provider = self.tracer_provider
        if provider is None:
            return None
        key = (name, version, schema_url)
        starter = self._span_starters.get(key)
        if starter is None:
            with _lock:
                starter = self._span_starters.get(key)
                if starter is None:
                    rule = build_sampling_rule(self.settings)
                    starter = self._span_starters[key] = LightSpanStarter(provider, name, version, rule, schema_url)
        return starter

    def master_tracer(self) -> trace.Tracer | None:
        """A tracer for the spans a master reports about its workers (``None`` when traces are off).

        The process's own tracer if it records (see :func:`record_in_master`); otherwise a tracer
        provider of the master's own is built on first use, never made global: forked workers
        set up their own and drop this one (:func:`mark_worker`).
        """
        if self.disabled or self.settings.sdk_disabled:
            return None
        if self.tracer is not None:
            return self.tracer
        with _lock:
            if self._master_provider is None:
                # Span-export counters of their own: the values land in the shared directory under
                # this process's id, so the endpoint sums them, while REGISTRY stays free for workers.
                metrics = SpanPipelineMetrics(CollectorRegistry(auto_describe=True))
                self._master_provider = build_tracer_provider(self.settings, metrics)
            return self._master_provider.get_tracer("spyglass", __version__)

    def flush(self, timeout_millis: int = 10000) -> bool:
        """Export every finished span now (before a worker exits, for example)."""
        flush_logs()
        if self.tracer_provider is None:
            return True
        return self.tracer_provider.force_flush(timeout_millis)


def current() -> Telemetry | None:
    """The telemetry of this process, or ``None`` before :func:`init`."""
    return _state


def mark_worker() -> None:
    """Declare this process a worker of a master that serves metrics (call right after fork).

    What the master set up stays the master's: the next :func:`init` builds this worker's own
    telemetry (tracer provider and export thread, metric instruments, exemplar file).
    """
    global _role_override, _state
    _role_override = "worker"
    if _state is not None and _state.role == "master":
        if _state.metrics_server is not None:
            # The listening socket came with the fork; only the master serves it.
            _state.metrics_server.server.socket.close()
        if _state._master_provider is not None:
            # Its queue was emptied at the fork; stop the export thread the fork restarted.
            _state._master_provider.shutdown()
        for metrics in (_state._celery_metrics, _state._db_metrics, _state.span_metrics, _state._log_metrics):
            if metrics is not None:  # the worker registers its own instruments
                metrics.unregister()
        _state = None


def _under_gunicorn() -> bool:
    return os.environ.get("SERVER_SOFTWARE", "").startswith("gunicorn")


def _under_celery_worker() -> bool:
    """Whether this is the main process of ``celery worker`` (it imports the app before forking its pool)."""
    program = os.path.basename(sys.argv[0]) if sys.argv else ""
    is_celery = program == "celery" or (program == "__main__.py" and "celery" in sys.argv[0])
    return is_celery and "worker" in sys.argv[1:]


def _detect_role() -> str:
    # With spyglass's gunicorn hooks loaded, every worker is marked in post_fork before it imports
    # the app, so an unmarked gunicorn process is the master (the app was preloaded in it). The
    # main process of a Celery worker is the master of its pool: the Celery integration marks each
    # pool process in worker_process_init.
    if _under_gunicorn() and "spyglass.gunicorn" in sys.modules:
        return "master"
    if _under_celery_worker():
        return "master"
    return "standalone"


def _setup_metrics(settings: Settings, role: str) -> tuple[str | None, ExemplarFile | None]:
    # A directory that cannot be used falls back to another one, or to memory (logged, counted).
    directory = multiprocess.open_directory(settings.metrics_dir, settings.service_name, role)
    if directory:
        # The master records no request, so it keeps no exemplars of its own.
        return directory, None if role == "master" else ExemplarFile(directory)
    return None, None


def _serving_registry(state: Telemetry) -> CollectorRegistry:
    settings, directory = state.settings, state.metrics_dir
    resource_info = ResourceInfoCollector(_resource_labels(settings), __version__)
    store_health = multiprocess.StoreHealthCollector()
    if directory is None:
        REGISTRY.register(resource_info)
        REGISTRY.register(store_health)
        state._extra_collectors += [resource_info, store_health]
        return REGISTRY
    registry = CollectorRegistry()
    registry.register(MultiProcessExemplarCollector(directory))
    registry.register(ProcessTreeCollector())
    registry.register(resource_info)
    registry.register(store_health)
    PlatformCollector(registry=registry)
    return registry


def _serve_metrics(state: Telemetry) -> None:
    """Start this process's metrics endpoint unless ``SPYGLASS_METRICS_PORT`` is 0."""
    settings = state.settings
    if settings.metrics_port:
        serving = _serving_registry(state)
        state.metrics_server = start_metrics_server(settings.metrics_host, settings.metrics_port, serving)
        if state.metrics_server is not None:
            state._serving_registry = serving


def _resource_labels(settings: Settings) -> dict[str, str]:
    labels = dict(settings.resource_attributes)
    labels["service.name"] = settings.service_name
    labels.setdefault("service.version", settings.service_version)
    labels["telemetry.distro.name"] = "spyglass"
    labels["telemetry.distro.version"] = __version__
    return labels


def init(settings: Settings | None = None, *, role: str | None = None) -> Telemetry:
    """Set up traces, metrics and logs for this process; later calls return the same state.

    ``settings`` default to :func:`spyglass.config.load_settings` (the environment). Raises
    :class:`spyglass.config.ConfigError` for an invalid setting.
    """
    global _state
    with _lock:
        if _state is not None:
            return _state
        settings = settings if settings is not None else load_settings()
        role = role or _role_override or _detect_role()
        if role not in ROLES:
            raise ValueError(f"role must be one of {', '.join(ROLES)}, not {role!r}")
        if settings.disabled:
            _state = Telemetry(settings, role, None, None, build_propagator(settings), None, None, Redactor(()))
            return _state
        configure_logging(settings)
        if _under_gunicorn() and role == "standalone":
            _logger.warning(
                "gunicorn runs this app without spyglass's hooks: metrics cover one worker only; "
                "start it with `gunicorn -c python:spyglass.gunicorn` or import the hooks into your config"
            )
        directory, exemplar_file = _setup_metrics(settings, role)
        log_metrics = LogPipelineMetrics(REGISTRY) if settings.logs_exporters else None
        attach_log_metrics(log_metrics)
        propagator = build_propagator(settings)
        if role == "master":
            # The master handles no request: it owns the directory and serves the endpoint.
            state = Telemetry(settings, role, None, None, propagator, None, None, Redactor(settings.redact_keys))
            state._log_metrics = log_metrics
            state.metrics_dir = directory
            if directory:
                state._compactor = multiprocess.ExitedProcessCompactor(directory).start()
            _serve_metrics(state)
            _state = state
            return state
        registry = REGISTRY
        span_metrics = SpanPipelineMetrics(registry)
        http_metrics = HttpServerMetrics(registry, exemplar_file)
        provider = None
        tracer = None
        server_spans = None
        if not settings.sdk_disabled:
            provider = build_tracer_provider(settings, span_metrics)
            trace.set_tracer_provider(provider)
            tracer = provider.get_tracer("spyglass", __version__)
            server_spans = LightSpanStarter(provider, "spyglass", __version__, build_sampling_rule(settings))
        propagate.set_global_textmap(propagator)
        state = Telemetry(
            settings=settings,
            role=role,
            tracer=tracer,
            tracer_provider=provider,
            propagator=propagator,
            http_metrics=http_metrics,
            span_metrics=span_metrics,
            redactor=Redactor(settings.redact_keys),
            metrics_dir=directory,
            server_spans=server_spans,
            exemplar_file=exemplar_file,
            _log_metrics=log_metrics,
        )
        if role != "worker":
            _serve_metrics(state)
        _state = state
        return state


def record_in_master() -> Telemetry | None:
    """Make the master record what it runs itself: traces (global provider), exemplars.

    For a Celery worker whose pool runs tasks in the main process (solo, threads, gevent,
    eventlet): the main process was set up as a master (it serves the endpoint that reads the
    metrics directory) and now also records like a worker, into the same directory. Call it
    before the process runs any work; returns the state (``None`` before :func:`init`).
    """
    with _lock:
        state = _state
        if state is None or state.disabled or state.role != "master" or state.span_metrics is not None:
            return state
        state.span_metrics = SpanPipelineMetrics(REGISTRY)
        if state.metrics_dir:
            state.exemplar_file = ExemplarFile(state.metrics_dir)
        if not state.settings.sdk_disabled:
            provider = build_tracer_provider(state.settings, state.span_metrics)
            trace.set_tracer_provider(provider)
            state.tracer_provider = provider
            state.tracer = provider.get_tracer("spyglass", __version__)
        propagate.set_global_textmap(state.propagator)
        return state


def set_log_level(level: str) -> None:
    """Log at ``level`` (one of :data:`spyglass.config.LOG_LEVELS`) from now on, in this process and its children.

    For a host program's own level option (``celery worker --loglevel``) when
    ``SPYGLASS_LOG_LEVEL`` does not set one: that variable, when set, wins.
    """
    if level not in LOG_LEVELS:
        raise ValueError(f"log level must be one of {', '.join(LOG_LEVELS)}, not {level!r}")
    with _lock:
        os.environ["SPYGLASS_LOG_LEVEL"] = level  # processes started or forked later read it
        state = _state
        if state is None or state.disabled or state.settings.log_level == level:
            return
        state.settings = replace(state.settings, log_level=level)
        configure_logging(state.settings)


def shutdown(timeout_millis: int = 10000) -> None:
    """Flush and stop everything :func:`init` started; :func:`init` may be called again after."""
    global _state
    with _lock:
        state = _state
        if state is None:
            return
        _state = None
        for provider in (state.tracer_provider, state._master_provider):
            if provider is not None:
                provider.force_flush(timeout_millis)
                provider.shutdown()
        if state.metrics_server is not None:
            state.metrics_server.stop()
        if state._compactor is not None:
            state._compactor.stop()
        if not state.disabled:
            reset_logging()
        for metrics in (
            state.http_metrics,
            state.span_metrics,
            state._celery_metrics,
            state._db_metrics,
            state._log_metrics,
        ):
            if metrics is not None:
                metrics.unregister()
        for collector in state._extra_collectors:
            REGISTRY.unregister(collector)
        if state._serving_registry is not None:
            for collector in state._served_collectors:
                state._serving_registry.unregister(collector)
        if state.exemplar_file is not None:
            state.exemplar_file.close()
