"""The compose stack's Prometheus and Alertmanager configurations, adapted to run on this machine.

``collector/prometheus/prometheus.yml`` and ``collector/alertmanager/alertmanager.yml`` are written
for ``docker-compose.yml``: targets are compose service names (``web:9464``, ``alertmanager:9093``)
and the shop's processes are found by DNS. ``make demo`` runs the same files with only the
addresses changed, so the two cannot drift apart:

- every ``service:port`` the files name becomes ``127.0.0.1:<port the native process uses>``;
- a DNS service discovery entry becomes a static target that keeps ``__meta_dns_name``, so the
  relabelling (``job`` = ``shop-<service>``) works unchanged;
- jobs of services that run only in compose (the OpenTelemetry Collector) are left out;
- rule files are read from the repository's ``collector/prometheus/rules/``.

An address that is neither mapped nor known to be compose-only is an error: a service added to
the stack must be given a native address (or declared compose-only) here.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import yaml

__all__ = [
    "COMPOSE_ONLY",
    "NativeAddresses",
    "UnmappedAddressError",
    "alertmanager_config",
    "prometheus_config",
    "write_yaml",
]

COMPOSE_ONLY = frozenset({"otel-collector", "tempo", "loki", "grafana"})
"""Services of the stack that do not run natively: their scrape jobs are dropped."""


class UnmappedAddressError(ValueError):
    """A config names a ``host:port`` that has no native address and is not compose-only."""


@dataclass(frozen=True)
class NativeAddresses:
    """Where each compose ``(service, port)`` listens on this machine."""

    ports: Mapping[tuple[str, int], int]
    host: str = "127.0.0.1"
    compose_only: frozenset[str] = field(default=COMPOSE_ONLY)

    def address(self, host: str, port: int) -> str | None:
        """``127.0.0.1:<port>`` for a mapped service, ``None`` for a compose-only one."""
        native = self.ports.get((host, port))
        if native is not None:
            return f"{self.host}:{native}"
        if host in self.compose_only:
            return None
        raise UnmappedAddressError(f"{host}:{port} has no native address; map it in demo_app/native.py")

    def target(self, target: str) -> str | None:
        """A ``host:port`` target, adapted."""
        host, _, port = target.rpartition(":")
        return self.address(host, int(port))

    def url(self, url: str) -> str:
        """A URL whose host is a compose service, adapted (compose-only services are an error here)."""
        parts = urlsplit(url)
        address = self.address(parts.hostname or "", parts.port or (443 if parts.scheme == "https" else 80))
        if address is None:
            raise UnmappedAddressError(f"{url} points at a service that does not run natively")
        return urlunsplit(parts._replace(netloc=address))


def _static_targets(addresses: NativeAddresses, static: dict[str, Any]) -> dict[str, Any] | None:
    targets = [native for target in static.get("targets", []) if (native := addresses.target(target)) is not None]
    if not targets:
        return None
    return {**static, "targets": targets}


def _dns_as_static(addresses: NativeAddresses, dns: dict[str, Any]) -> list[dict[str, Any]]:
    """A ``dns_sd_configs`` entry as static targets that keep the label the relabelling reads."""
    if dns.get("type", "SRV") != "A":
        raise UnmappedAddressError(f"only A-record discovery can be adapted, not {dns}")
    converted = []
    for name in dns["names"]:
        native = addresses.address(name, int(dns["port"]))
        if native is not None:
            converted.append({"targets": [native], "labels": {"__meta_dns_name": name}})
    return converted


def _scrape_config(addresses: NativeAddresses, job: dict[str, Any]) -> dict[str, Any] | None:
    job = copy.deepcopy(job)
    static = [
        adapted for entry in job.pop("static_configs", []) if (adapted := _static_targets(addresses, entry)) is not None
    ]
    for dns in job.pop("dns_sd_configs", []):
        static.extend(_dns_as_static(addresses, dns))
    unknown = sorted(key for key in job if key.endswith("_sd_configs"))
    if unknown:
        raise UnmappedAddressError(f"job {job['job_name']}: cannot adapt {', '.join(unknown)}")
    if not static:
        return None
    job["static_configs"] = static
    return job


def prometheus_config(source: Path, addresses: NativeAddresses, rules_dir: Path) -> dict[str, Any]:
    """The compose Prometheus configuration in ``source``, adapted (see the module's docstring)."""
    config = yaml.safe_load(source.read_text())
    config["rule_files"] = [str(rules_dir / Path(pattern).name) for pattern in config.get("rule_files", [])]
    for alertmanagers in config.get("alerting", {}).get("alertmanagers", []):
        alertmanagers["static_configs"] = [
            adapted
            for entry in alertmanagers.get("static_configs", [])
            if (adapted := _static_targets(addresses, entry)) is not None
        ]
    config["scrape_configs"] = [
        adapted for job in config.get("scrape_configs", []) if (adapted := _scrape_config(addresses, job)) is not None
    ]
    return config


def alertmanager_config(source: Path, addresses: NativeAddresses) -> dict[str, Any]:
    """The compose Alertmanager configuration in ``source`` with its webhook URLs adapted."""
    config = yaml.safe_load(source.read_text())
    for receiver in config.get("receivers", []):
        for webhook in receiver.get("webhook_configs", []):
            webhook["url"] = addresses.url(webhook["url"])
    return config


def write_yaml(config: dict[str, Any], path: Path, header: str) -> Path:
    """Write ``config`` to ``path`` (directories created) under a comment saying where it came from."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"# {header}\n" + yaml.safe_dump(config, sort_keys=False))
    return path
