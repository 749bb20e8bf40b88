"""Where alerts and dashboards point people: the runbooks and Grafana.

One place for both, so that an alert's ``runbook_url`` and a dashboard panel's runbook link agree.
Point them at your own copy (the repository that serves ``docs/runbooks.md``, the Grafana people
open), then run ``make rules dashboards`` to regenerate what uses them.
"""

from __future__ import annotations

from urllib.parse import quote, urlencode

__all__ = ["DASHBOARD_UIDS", "GRAFANA_URL", "RUNBOOKS_URL", "dashboard_url", "runbook_url"]

RUNBOOKS_URL = "https://github.com/spyglass-observability/spyglass/blob/main/docs/runbooks.md"
"""``docs/runbooks.md`` as people read it; each alert has a section whose anchor is its name in lower case."""

GRAFANA_URL = "http://127.0.0.1:3000"
"""Grafana of the compose stack (``GRAFANA_PORT``, bound to the loopback interface)."""

DASHBOARD_UIDS: dict[str, str] = {
    "service": "spyglass-service",
    "celery": "spyglass-celery",
    "slo": "spyglass-slo",
    "database": "spyglass-database",
}
"""Each dashboard's fixed uid (its URL is ``/d/<uid>``)."""


def runbook_url(alert_name: str) -> str:
    """The runbook section of ``alert_name`` (a ``## AlertName`` heading in ``docs/runbooks.md``)."""
    return f"{RUNBOOKS_URL}#{alert_name.lower()}"


def dashboard_url(dashboard: str, **variables: str) -> str:
    """The URL of a dashboard (a key of :data:`DASHBOARD_UIDS`), with template variables set.

    Values may hold Prometheus alert templates such as ``{{ $labels.job }}``: braces, ``$``, dots and
    spaces are left unencoded so that the template stays valid and Prometheus fills it in.
    """
    url = f"{GRAFANA_URL}/d/{DASHBOARD_UIDS[dashboard]}"
    if not variables:
        return url
    query = urlencode({f"var-{name}": value for name, value in variables.items()}, safe="{}$. ", quote_via=quote)
    return f"{url}?{query}"
