"""Fill a benchmark queue with no-op tasks, from a process instrumented like the variant's worker.

Run by the Celery benchmarks, with the variant's environment (``BENCH_CELERY_VARIANT``,
``BENCH_QUEUE``, ``CELERY_BROKER_URL`` ...)::

    python -m benchmarks.celery_publish --tasks N [--start-mark KEY --end-mark KEY]

The messages therefore carry what the variant's publishers put in them in production: spyglass's
publish-time header and ``traceparent``, OpenTelemetry's ``traceparent``, or nothing. With the
mark options, a :func:`benchmarks.celery_app.mark` task goes first and another last, so the
worker records when it started on the queue and when it reached its end.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

__all__ = ["main", "publish"]


def publish(tasks: int, start_mark: str | None = None, end_mark: str | None = None) -> None:
    """Publish ``tasks`` no-op tasks to the app's default queue, between the optional marks."""
    from benchmarks.celery_app import app, instrument_publisher, mark, noop

    shutdown = instrument_publisher()
    try:
        with app.producer_or_acquire() as producer:
            if start_mark:
                mark.apply_async((start_mark,), producer=producer)
            for _ in range(tasks):
                noop.apply_async(producer=producer)
            if end_mark:
                mark.apply_async((end_mark,), producer=producer)
    finally:
        shutdown()  # flushes the publish spans
        app.close()


def main(argv: Sequence[str] | None = None) -> int:
    """Publish as the command line says."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, required=True, help="number of no-op tasks")
    parser.add_argument("--start-mark", help="Redis key the first task (a mark) sets when it starts")
    parser.add_argument("--end-mark", help="Redis key the last task (a mark) sets when it starts")
    args = parser.parse_args(argv)
    if args.tasks < 0:
        parser.error("--tasks must not be negative")
    publish(args.tasks, args.start_mark, args.end_mark)
    return 0


if __name__ == "__main__":
    sys.exit(main())
