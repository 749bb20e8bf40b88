"""Import this module first thing in an app module to instrument the whole process.

    import spyglass.auto  # noqa: F401

It reads the configuration from the environment (failing loudly on an invalid value), sets up
traces, metrics and logs, and instruments every Flask and Celery app and every SQLAlchemy engine
of the process, whether it was created before or after this import. This is the one spyglass
module with side effects at import.
"""

from __future__ import annotations

from spyglass.runtime import init

__all__: list[str] = []

init()

try:
    import flask  # noqa: F401
except ImportError:  # pragma: no cover - a Celery-only service
    pass
else:
    from spyglass.integrations.flask import install_auto_instrumentation

    install_auto_instrumentation()

try:
    import celery  # noqa: F401
except ImportError:  # pragma: no cover - a Flask-only service
    pass
else:
    from spyglass.integrations import celery as _celery_integration

    _celery_integration.install_auto_instrumentation()

try:
    import sqlalchemy  # noqa: F401
except ImportError:  # pragma: no cover - a service without SQLAlchemy
    pass
else:
    from spyglass.integrations import sqlalchemy as _sqlalchemy_integration

    _sqlalchemy_integration.install_auto_instrumentation()
