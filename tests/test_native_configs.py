"""make demo runs the compose stack's Prometheus and Alertmanager configs, with only addresses changed."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml

from demo_app.native import Ports
from demo_app.native_configs import (
    NativeAddresses,
    UnmappedAddressError,
    alertmanager_config,
    prometheus_config,
    write_yaml,
)
from tests.conftest import REPO

PROMETHEUS = REPO / "collector/prometheus/prometheus.yml"
ALERTMANAGER = REPO / "collector/alertmanager/alertmanager.yml"
RULES = REPO / "collector/prometheus/rules"
PORTS = Ports(
    app=18000,
    web_metrics=19464,
    worker_metrics=19465,
    beat_metrics=19466,
    prometheus=19090,
    alertmanager=19093,
    alert_sink=19095,
)


def test_the_adapted_prometheus_config_differs_from_compose_only_in_addresses_and_paths(tmp_path: Path) -> None:
    """Same global settings, jobs (but the compose-only Collector's), relabelling and alerting; targets
    on 127.0.0.1 at the demo's ports; the rule files are the repository's; promtool accepts it.
    """
    compose = yaml.safe_load(PROMETHEUS.read_text())
    native = prometheus_config(PROMETHEUS, PORTS.addresses(), RULES)
    assert native["global"] == compose["global"]
    assert native["rule_files"] == [str(RULES / "*.yml")]
    compose_jobs = {job["job_name"]: job for job in compose["scrape_configs"]}
    native_jobs = {job["job_name"]: job for job in native["scrape_configs"]}
    assert set(compose_jobs) - set(native_jobs) == {"otel-collector"}
    for name, job in native_jobs.items():
        assert job.get("relabel_configs") == compose_jobs[name].get("relabel_configs"), name
    shop = {entry["labels"]["__meta_dns_name"]: entry["targets"] for entry in native_jobs["shop"]["static_configs"]}
    assert shop == {"web": ["127.0.0.1:19464"], "worker": ["127.0.0.1:19465"], "beat": ["127.0.0.1:19466"]}
    assert native_jobs["prometheus"]["static_configs"][0]["targets"] == ["127.0.0.1:19090"]
    assert native["alerting"]["alertmanagers"][0]["static_configs"][0]["targets"] == ["127.0.0.1:19093"]
    path = write_yaml(native, tmp_path / "prometheus.yml", "test")
    result = subprocess.run(["promtool", "check", "config", str(path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_adapted_alertmanager_config_sends_to_the_native_alert_sink(tmp_path: Path) -> None:
    """Routes and inhibition are the compose ones; webhooks go to the native alert sink; amtool accepts it,
    and routes critical alerts to the page receiver and warnings to the ticket receiver.
    """
    compose = yaml.safe_load(ALERTMANAGER.read_text())
    native = alertmanager_config(ALERTMANAGER, PORTS.addresses())
    assert native["route"] == compose["route"] and native["inhibit_rules"] == compose["inhibit_rules"]
    urls = [hook["url"] for receiver in native["receivers"] for hook in receiver["webhook_configs"]]
    assert urls == ["http://127.0.0.1:19095/webhook/page", "http://127.0.0.1:19095/webhook/ticket"]
    path = write_yaml(native, tmp_path / "alertmanager.yml", "test")
    assert subprocess.run(["amtool", "check-config", str(path)], capture_output=True).returncode == 0
    for severity, receiver in (("critical", "page"), ("warning", "ticket")):
        routed = subprocess.run(
            ["amtool", "config", "routes", "test", f"--config.file={path}", "alertname=X", f"severity={severity}"],
            capture_output=True,
            text=True,
        )
        assert routed.stdout.strip() == receiver, routed.stdout + routed.stderr


def test_an_address_with_no_native_counterpart_is_an_error_not_a_silent_gap(tmp_path: Path) -> None:
    """A service added to the compose configs must be mapped (or declared compose-only) before make demo runs."""
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "scrape_configs:\n"
        "  - job_name: new-service\n"
        "    static_configs: [{targets: ['new-service:8080']}]\n"
        "  - job_name: tempo\n"
        "    static_configs: [{targets: ['tempo:3200']}]\n"
    )
    with pytest.raises(UnmappedAddressError, match="new-service:8080"):
        prometheus_config(config, PORTS.addresses(), RULES)
    only_tempo = NativeAddresses({("new-service", 8080): 18080})
    adapted = prometheus_config(config, only_tempo, RULES)
    assert [job["job_name"] for job in adapted["scrape_configs"]] == ["new-service"]
