"""The parts of grafana-foundation-sdk the dashboards use, imported once without its deprecation noise.

The SDK warns at import that it prefers its v2 dashboard schema (Grafana 12's dynamic dashboards),
which Grafana's file provisioning loads only behind feature flags; spyglass builds the classic
schema, which every Grafana provisions. The warning is silenced for these imports only.
"""

from __future__ import annotations

import warnings

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    from grafana_foundation_sdk.builders import common as common_builders
    from grafana_foundation_sdk.builders import dashboard, logs, loki, prometheus, stat, table, timeseries
    from grafana_foundation_sdk.cog.encoder import JSONEncoder
    from grafana_foundation_sdk.models import common
    from grafana_foundation_sdk.models import dashboard as dashboard_model
    from grafana_foundation_sdk.models.common import DataSourceRef
    from grafana_foundation_sdk.models.prometheus import PromQueryFormat

__all__ = [
    "DataSourceRef",
    "JSONEncoder",
    "PromQueryFormat",
    "common",
    "common_builders",
    "dashboard",
    "dashboard_model",
    "logs",
    "loki",
    "prometheus",
    "stat",
    "table",
    "timeseries",
]
