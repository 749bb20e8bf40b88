"""The docs that are generated from code match the code."""

from __future__ import annotations

import re
from pathlib import Path

from spyglass.catalog import CATALOG, render_markdown

REPO = Path(__file__).resolve().parent.parent


def test_metric_reference_is_rendered_from_the_catalog() -> None:
    """docs/metrics.md is exactly what `make docs` renders from spyglass.catalog."""
    assert (REPO / "docs/metrics.md").read_text() == render_markdown()


def test_metric_names_follow_prometheus_conventions() -> None:
    """Counters end in _total, durations are in seconds, sizes in bytes, names are snake_case."""
    for spec in CATALOG:
        assert re.fullmatch(r"[a-z][a-z0-9_]*", spec.name), spec.name
        assert (spec.type == "counter") == spec.name.endswith("_total"), spec.name
        if spec.unit in ("seconds", "bytes"):
            assert spec.unit in spec.name, spec.name
        for label in spec.labels:
            assert re.fullmatch(r"[a-z][a-z0-9_]*", label), (spec.name, label)


def test_every_metric_named_in_the_docs_is_in_the_catalog() -> None:
    """A metric name quoted anywhere in docs/ or the README exists in the catalog."""
    known = {spec.name for spec in CATALOG}
    known |= {
        spec.name + suffix for spec in CATALOG if spec.type == "histogram" for suffix in ("_bucket", "_sum", "_count")
    }
    known |= {label for spec in CATALOG for label in spec.labels}  # label names are quoted too
    pattern = re.compile(r"`((?:http_server|otel_sdk|spyglass|process|celery|target|python)_[a-z0-9_]+)(?![a-z0-9_.])")
    for path in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]:
        for name in pattern.findall(path.read_text()):
            assert name in known, f"{path.name} names {name}, which is not in the catalog"
