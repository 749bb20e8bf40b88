"""Settings read from the environment: standard ``OTEL_*`` variables first, then ``SPYGLASS_*``.

Every variable is validated when :func:`spyglass.init` runs. An invalid value raises
:class:`ConfigError` naming the variable, the value and what it accepts, so a typo fails at
start-up instead of silently falling back to a default (which is what the OpenTelemetry SDK does).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from urllib.parse import unquote, urlsplit

__all__ = [
    "DEFAULT_EXCLUDED_URLS",
    "DEFAULT_REDACT_KEYS",
    "ConfigError",
    "Settings",
    "load_settings",
]

TRACES_EXPORTERS = ("otlp", "console", "none", "otlp_json_file")
# "console": the JSON lines on stdout only (they always go there); the others export them as well.
LOGS_EXPORTERS = ("otlp", "console", "none", "otlp_json_file")
SAMPLERS = (
    "always_on",
    "always_off",
    "traceidratio",
    "parentbased_always_on",
    "parentbased_always_off",
    "parentbased_traceidratio",
)
PROPAGATORS = ("tracecontext", "baggage", "none")
OTLP_PROTOCOLS = ("http/protobuf",)
LOG_FORMATS = ("json", "console")
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
DEFAULT_REDACT_KEYS = (
    "password",
    "passwd",
    "secret",
    "token",
    "authorization",
    "cookie",
    "set-cookie",
    "api_key",
    "apikey",
    "api-key",
    "x-api-key",
    "session",
    "private_key",
    "credentials",
)
DEFAULT_EXCLUDED_URLS = ("^/metrics$", "^/health", "^/livez$", "^/readyz$")
# The HTTP methods of RFC 9110 and RFC 5789: the default of the semantic conventions.
DEFAULT_KNOWN_METHODS = ("CONNECT", "DELETE", "GET", "HEAD", "OPTIONS", "PATCH", "POST", "PUT", "TRACE")
_TRUE = ("true", "1", "yes", "on")
_FALSE = ("false", "0", "no", "off", "")
_RESOURCE_KEY = re.compile(r"^[A-Za-z0-9_.\-/]+$")


class ConfigError(ValueError):
    """An environment variable holds a value spyglass cannot use."""

    def __init__(self, variable: str, value: str, accepted: str) -> None:
        self.variable = variable
        self.value = value
        self.accepted = accepted
        super().__init__(f"{variable}={value!r} is not valid: {accepted}")


@dataclass(frozen=True)
class Settings:
    """The validated configuration of one process. Build it with :func:`load_settings`."""

    disabled: bool = False
    service_name: str = "unknown_service:python"
    resource_attributes: Mapping[str, str] = field(default_factory=dict)
    sdk_disabled: bool = False
    traces_exporters: tuple[str, ...] = ("otlp_json_file",)
    traces_sampler: str = "parentbased_always_on"
    traces_sampler_arg: float = 1.0
    otlp_traces_endpoint: str = "http://localhost:4318/v1/traces"
    otlp_timeout_s: float = 10.0
    traces_file: str = "var/otlp/traces.jsonl"
    logs_exporters: tuple[str, ...] = ()
    """Where log records go besides stdout: ``otlp``, ``otlp_json_file`` (empty: nowhere else)."""
    otlp_logs_endpoint: str = "http://localhost:4318/v1/logs"
    logs_file: str = "var/otlp/logs.jsonl"
    blrp_max_queue_size: int = 2048
    blrp_schedule_delay_ms: int = 1000
    blrp_max_export_batch_size: int = 512
    propagators: tuple[str, ...] = ("tracecontext", "baggage")
    bsp_max_queue_size: int = 2048
    bsp_schedule_delay_ms: int = 5000
    bsp_max_export_batch_size: int = 512
    bsp_export_timeout_ms: int = 30000
    metrics_host: str = "127.0.0.1"
    metrics_port: int = 9464
    metrics_dir: str | None = None
    log_format: str = "json"
    log_level: str = "info"
    access_log: bool = True
    log_flush_interval_s: float = 0.1
    redact_keys: tuple[str, ...] = DEFAULT_REDACT_KEYS
    excluded_urls: tuple[str, ...] = DEFAULT_EXCLUDED_URLS
    known_methods: frozenset[str] = frozenset(DEFAULT_KNOWN_METHODS)
    traceresponse: bool = True
    db_n_plus_one_threshold: int = 5
    """Runs of one SQL statement within one request or task that count as N+1 queries (0: off)."""

    @property
    def service_version(self) -> str:
        """``service.version`` from ``OTEL_RESOURCE_ATTRIBUTES``, or ``unknown``."""
        return self.resource_attributes.get("service.version", "unknown")


def _get(env: Mapping[str, str], name: str) -> str | None:
    value = env.get(name)
    if value is None:
        return None
    value = value.strip()
    return value


def _bool(env: Mapping[str, str], name: str, default: bool) -> bool:
    raw = _get(env, name)
    if raw is None or raw == "":
        return default
    lowered = raw.lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise ConfigError(name, raw, "use true or false")


def _int(env: Mapping[str, str], name: str, default: int, minimum: int, maximum: int | None = None) -> int:
    raw = _get(env, name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        value = None
    if value is None or value < minimum or (maximum is not None and value > maximum):
        upper = f" and {maximum}" if maximum is not None else ""
        bound = f"between {minimum}{upper}" if maximum is not None else f"of at least {minimum}"
        raise ConfigError(name, raw, f"use a whole number {bound}")
    return value


def _seconds(env: Mapping[str, str], name: str, default: float) -> float:
    raw = _get(env, name)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not 0.0 <= value <= 60.0:
        raise ConfigError(name, raw, "use a number of seconds from 0 to 60 (0 writes every line at once)")
    return value


def _choice(env: Mapping[str, str], name: str, default: str, accepted: tuple[str, ...]) -> str:
    raw = _get(env, name)
    if raw is None or raw == "":
        return default
    lowered = raw.lower()
    if lowered not in accepted:
        raise ConfigError(name, raw, "accepted values are " + ", ".join(accepted))
    return lowered


def _list(env: Mapping[str, str], name: str) -> tuple[str, ...] | None:
    raw = _get(env, name)
    if raw is None:
        return None
    return tuple(item.strip() for item in raw.split(",") if item.strip())


def _url(env: Mapping[str, str], name: str) -> str | None:
    raw = _get(env, name)
    if raw is None or raw == "":
        return None
    parts = urlsplit(raw)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ConfigError(name, raw, "use an http:// or https:// URL such as http://localhost:4318")
    return raw


def _resource_attributes(env: Mapping[str, str]) -> dict[str, str]:
    raw = _get(env, "OTEL_RESOURCE_ATTRIBUTES")
    attributes: dict[str, str] = {}
    if not raw:
        return attributes
    for pair in raw.split(","):
        if not pair.strip():
            continue
        key, sep, value = pair.partition("=")
        key = key.strip()
        if not sep or not _RESOURCE_KEY.match(key):
            raise ConfigError(
                "OTEL_RESOURCE_ATTRIBUTES", raw, "use comma-separated key=value pairs such as service.version=1.2.0"
            )
        attributes[key] = unquote(value.strip())
    return attributes


def _traces_exporters(env: Mapping[str, str], endpoint_given: bool) -> tuple[str, ...]:
    names = _list(env, "OTEL_TRACES_EXPORTER")
    if not names:
        # Local runs write OTLP JSON lines; naming a collector endpoint switches to OTLP/HTTP.
        return ("otlp",) if endpoint_given else ("otlp_json_file",)
    lowered = tuple(name.lower() for name in names)
    for name in lowered:
        if name not in TRACES_EXPORTERS:
            raise ConfigError(
                "OTEL_TRACES_EXPORTER",
                env["OTEL_TRACES_EXPORTER"],
                "accepted values are " + ", ".join(TRACES_EXPORTERS),
            )
    if "none" in lowered:
        return ("none",)
    return tuple(dict.fromkeys(lowered))


def _logs_exporters(env: Mapping[str, str], endpoint_given: bool) -> tuple[str, ...]:
    names = _list(env, "OTEL_LOGS_EXPORTER")
    if not names:
        # Lines always go to stdout; naming a collector endpoint sends them there as well.
        return ("otlp",) if endpoint_given else ()
    lowered = tuple(name.lower() for name in names)
    for name in lowered:
        if name not in LOGS_EXPORTERS:
            raise ConfigError(
                "OTEL_LOGS_EXPORTER", env["OTEL_LOGS_EXPORTER"], "accepted values are " + ", ".join(LOGS_EXPORTERS)
            )
    return tuple(dict.fromkeys(name for name in lowered if name not in ("none", "console")))


def _sampler_arg(env: Mapping[str, str], sampler: str) -> float:
    raw = _get(env, "OTEL_TRACES_SAMPLER_ARG")
    if raw is None or raw == "" or not sampler.endswith("traceidratio"):
        return 1.0
    try:
        ratio = float(raw)
    except ValueError:
        ratio = -1.0
    if not 0.0 <= ratio <= 1.0:
        raise ConfigError("OTEL_TRACES_SAMPLER_ARG", raw, "use a sampling ratio between 0.0 and 1.0")
    return ratio


def _protocols(env: Mapping[str, str]) -> None:
    signals = ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_EXPORTER_OTLP_LOGS_PROTOCOL")
    for name in (*signals, "OTEL_EXPORTER_OTLP_PROTOCOL"):
        raw = _get(env, name)
        if raw and raw.lower() not in OTLP_PROTOCOLS:
            raise ConfigError(name, raw, "spyglass exports OTLP over HTTP; accepted values are http/protobuf")


def _propagators(env: Mapping[str, str]) -> tuple[str, ...]:
    names = _list(env, "OTEL_PROPAGATORS")
    if names is None:
        return ("tracecontext", "baggage")
    lowered = tuple(name.lower() for name in names)
    for name in lowered:
        if name not in PROPAGATORS:
            raise ConfigError(
                "OTEL_PROPAGATORS", env["OTEL_PROPAGATORS"], "accepted values are " + ", ".join(PROPAGATORS)
            )
    return tuple(name for name in lowered if name != "none")


def _metrics_port(env: Mapping[str, str]) -> int:
    return _int(env, "SPYGLASS_METRICS_PORT", 9464, 0, 65535)


def _excluded_urls(env: Mapping[str, str]) -> tuple[str, ...]:
    for name in ("SPYGLASS_EXCLUDED_URLS", "OTEL_PYTHON_FLASK_EXCLUDED_URLS", "OTEL_PYTHON_EXCLUDED_URLS"):
        patterns = _list(env, name)
        if patterns is None:
            continue
        for pattern in patterns:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ConfigError(
                    name, env[name], f"use comma-separated regular expressions ({pattern!r}: {exc})"
                ) from None
        return patterns
    return DEFAULT_EXCLUDED_URLS


def _known_methods(env: Mapping[str, str]) -> frozenset[str]:
    methods = _list(env, "OTEL_INSTRUMENTATION_HTTP_KNOWN_METHODS")
    if not methods:
        return frozenset(DEFAULT_KNOWN_METHODS)
    for method in methods:
        if not method.isalpha():
            raise ConfigError(
                "OTEL_INSTRUMENTATION_HTTP_KNOWN_METHODS",
                env["OTEL_INSTRUMENTATION_HTTP_KNOWN_METHODS"],
                "use comma-separated HTTP method names such as GET,POST",
            )
    return frozenset(method.upper() for method in methods)


def _otlp_endpoint(env: Mapping[str, str], signal: str) -> tuple[str, bool]:
    """The OTLP/HTTP URL of ``signal`` (traces, logs) and whether the environment named one."""
    url = _url(env, f"OTEL_EXPORTER_OTLP_{signal.upper()}_ENDPOINT")
    if url:
        return url, True
    base = _url(env, "OTEL_EXPORTER_OTLP_ENDPOINT")
    if base:
        return base.rstrip("/") + f"/v1/{signal}", True
    return f"http://localhost:4318/v1/{signal}", False


def _timeout_s(env: Mapping[str, str]) -> float:
    for name in ("OTEL_EXPORTER_OTLP_TRACES_TIMEOUT", "OTEL_EXPORTER_OTLP_TIMEOUT"):
        raw = _get(env, name)
        if raw:
            # The specification gives milliseconds; the Python SDK has long read seconds.
            # A value of 1000 or more is read as milliseconds, anything smaller as seconds.
            try:
                number = float(raw)
            except ValueError:
                number = -1.0
            if number <= 0:
                raise ConfigError(name, raw, "use a positive timeout in milliseconds, such as 10000")
            return number / 1000.0 if number >= 1000 else number
    return 10.0


def load_settings(env: Mapping[str, str] | None = None) -> Settings:
    """Read and validate the configuration from ``env`` (``os.environ`` by default).

    Raises :class:`ConfigError` for the first invalid variable found.
    """
    env = os.environ if env is None else env
    resource = _resource_attributes(env)
    service_name = _get(env, "OTEL_SERVICE_NAME") or resource.get("service.name") or "unknown_service:python"
    endpoint, endpoint_given = _otlp_endpoint(env, "traces")
    logs_endpoint, logs_endpoint_given = _otlp_endpoint(env, "logs")
    _protocols(env)
    sampler = _choice(env, "OTEL_TRACES_SAMPLER", "parentbased_always_on", SAMPLERS)
    metrics_dir = _get(env, "SPYGLASS_METRICS_DIR") or _get(env, "PROMETHEUS_MULTIPROC_DIR") or None
    redact = _list(env, "SPYGLASS_REDACT_KEYS")
    queue_size = _int(env, "OTEL_BSP_MAX_QUEUE_SIZE", 2048, 1)
    batch_size = _int(env, "OTEL_BSP_MAX_EXPORT_BATCH_SIZE", min(512, queue_size), 1)
    if batch_size > queue_size:
        raise ConfigError(
            "OTEL_BSP_MAX_EXPORT_BATCH_SIZE", str(batch_size), f"use at most OTEL_BSP_MAX_QUEUE_SIZE ({queue_size})"
        )
    log_queue_size = _int(env, "OTEL_BLRP_MAX_QUEUE_SIZE", 2048, 1)
    log_batch_size = _int(env, "OTEL_BLRP_MAX_EXPORT_BATCH_SIZE", min(512, log_queue_size), 1)
    if log_batch_size > log_queue_size:
        raise ConfigError(
            "OTEL_BLRP_MAX_EXPORT_BATCH_SIZE",
            str(log_batch_size),
            f"use at most OTEL_BLRP_MAX_QUEUE_SIZE ({log_queue_size})",
        )
    return Settings(
        disabled=_bool(env, "SPYGLASS_DISABLED", False),
        service_name=service_name,
        resource_attributes=resource,
        sdk_disabled=_bool(env, "OTEL_SDK_DISABLED", False),
        traces_exporters=_traces_exporters(env, endpoint_given),
        traces_sampler=sampler,
        traces_sampler_arg=_sampler_arg(env, sampler),
        otlp_traces_endpoint=endpoint,
        otlp_timeout_s=_timeout_s(env),
        traces_file=_get(env, "SPYGLASS_TRACES_FILE") or "var/otlp/traces.jsonl",
        propagators=_propagators(env),
        bsp_max_queue_size=queue_size,
        bsp_schedule_delay_ms=_int(env, "OTEL_BSP_SCHEDULE_DELAY", 5000, 1),
        bsp_max_export_batch_size=batch_size,
        logs_exporters=_logs_exporters(env, logs_endpoint_given),
        otlp_logs_endpoint=logs_endpoint,
        logs_file=_get(env, "SPYGLASS_LOGS_FILE") or "var/otlp/logs.jsonl",
        blrp_max_queue_size=log_queue_size,
        blrp_schedule_delay_ms=_int(env, "OTEL_BLRP_SCHEDULE_DELAY", 1000, 1),
        blrp_max_export_batch_size=log_batch_size,
        bsp_export_timeout_ms=_int(env, "OTEL_BSP_EXPORT_TIMEOUT", 30000, 1),
        metrics_host=_get(env, "SPYGLASS_METRICS_HOST") or "127.0.0.1",
        metrics_port=_metrics_port(env),
        metrics_dir=metrics_dir,
        log_format=_choice(env, "SPYGLASS_LOG_FORMAT", "json", LOG_FORMATS),
        log_level=_choice(env, "SPYGLASS_LOG_LEVEL", "info", LOG_LEVELS),
        access_log=_bool(env, "SPYGLASS_ACCESS_LOG", True),
        log_flush_interval_s=_seconds(env, "SPYGLASS_LOG_FLUSH_INTERVAL", 0.1),
        redact_keys=tuple(key.lower() for key in redact) if redact is not None else DEFAULT_REDACT_KEYS,
        excluded_urls=_excluded_urls(env),
        known_methods=_known_methods(env),
        traceresponse=_bool(env, "SPYGLASS_TRACERESPONSE", True),
        db_n_plus_one_threshold=_n_plus_one_threshold(env),
    )


def _n_plus_one_threshold(env: Mapping[str, str]) -> int:
    threshold = _int(env, "SPYGLASS_DB_N_PLUS_ONE_THRESHOLD", 5, 0)
    if threshold == 1:
        raise ConfigError(
            "SPYGLASS_DB_N_PLUS_ONE_THRESHOLD", "1", "use 0 (off) or at least 2: every statement runs once"
        )
    return threshold
