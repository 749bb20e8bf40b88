"""The spyglass Grafana dashboards, built as code with grafana-foundation-sdk.

``python -m dashboards`` (``make dashboards``) writes each dashboard's JSON into ``dashboards/json/``
(which Grafana's provider loads) and the readable layout summary into ``docs/dashboards.md``.
"""
