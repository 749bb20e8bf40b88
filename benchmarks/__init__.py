"""Benchmarks of the cost spyglass adds to a request.

``python -m benchmarks.run`` (``make bench``) measures the per-request CPU of a Flask "hello" route
with and without instrumentation and writes ``docs/performance.md``.
"""
