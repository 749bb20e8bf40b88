"""An existing gunicorn config that imports spyglass's hooks and keeps its own settings."""

from spyglass.gunicorn import child_exit, logger_class, on_exit, on_starting, post_fork, worker_exit  # noqa: F401

workers = 2
timeout = 30
