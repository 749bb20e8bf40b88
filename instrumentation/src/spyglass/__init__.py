"""spyglass: traces, metrics and JSON logs for Flask and Celery services, from one import.

``import spyglass.auto`` instruments every Flask and Celery app of the process. For explicit control::

    import spyglass

    spyglass.init()                  # reads OTEL_* and SPYGLASS_* variables; idempotent
    spyglass.instrument_flask(app)   # one Flask app only
    spyglass.instrument_celery(app)  # one Celery app only
    spyglass.instrument_sqlalchemy(engine)  # one SQLAlchemy engine only

See ``docs/configuration.md`` for every setting.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = [
    "ConfigError",
    "Settings",
    "Telemetry",
    "__version__",
    "get_logger",
    "init",
    "instrument_celery",
    "instrument_flask",
    "instrument_sqlalchemy",
    "load_settings",
    "shutdown",
]

if TYPE_CHECKING:  # pragma: no cover
    import celery
    import flask
    import sqlalchemy

    from spyglass.config import ConfigError, Settings, load_settings
    from spyglass.runtime import Telemetry


def __getattr__(name: str) -> Any:
    # Keep `import spyglass` cheap and free of side effects: load the parts on first use.
    if name in ("ConfigError", "Settings", "load_settings"):
        from spyglass import config

        return getattr(config, name)
    if name == "Telemetry":
        from spyglass.runtime import Telemetry

        return Telemetry
    raise AttributeError(f"module 'spyglass' has no attribute {name!r}")


def init(settings: Settings | None = None) -> Telemetry:
    """Set up traces, metrics and logs for this process from the environment (idempotent).

    Raises :class:`ConfigError` naming the variable when a setting is invalid.
    """
    from spyglass import runtime

    return runtime.init(settings)


def instrument_flask(app: flask.Flask) -> flask.Flask:
    """Instrument one Flask app; calls :func:`init` first if needed. Returns the app."""
    from spyglass.integrations.flask import instrument_flask as _instrument_flask

    return _instrument_flask(app)


def instrument_celery(app: celery.Celery) -> celery.Celery:
    """Instrument a Celery app's publishing (more to come); calls :func:`init` first if needed. Returns the app."""
    from spyglass.integrations.celery import instrument_celery as _instrument_celery

    return _instrument_celery(app)


def instrument_sqlalchemy(engine: sqlalchemy.Engine) -> sqlalchemy.Engine:
    """Trace and measure one SQLAlchemy engine's statements, with N+1 detection; returns the engine.

    Calls :func:`init` first if needed. ``import spyglass.auto`` does this for every engine.
    """
    from spyglass.integrations.sqlalchemy import instrument_sqlalchemy as _instrument_sqlalchemy

    return _instrument_sqlalchemy(engine)


def shutdown(timeout_millis: int = 10000) -> None:
    """Export pending spans and stop the metrics endpoint."""
    from spyglass import runtime

    runtime.shutdown(timeout_millis)


def get_logger(name: str = "app", **initial_values: Any) -> Any:
    """A structlog logger writing through the spyglass pipeline (JSON, trace ids, redaction)."""
    from spyglass.logs import get_logger as _get_logger

    return _get_logger(name, **initial_values)
