"""The compose stack's files agree with each other and with what the pinned images accept.

Docker cannot run on every machine that runs the tests, so the stack is proven statically:
docker-compose.yml against the Compose Specification schema (tests/schemas/), interpolated the
way compose does it; every address a config names against the services compose runs and the
ports they listen on; the Collector configuration against the components of the pinned
otelcol-contrib release; Grafana's provisioning against its own data source uids; Prometheus
and Alertmanager configurations with promtool and amtool.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jsonschema
import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
COMPOSE_FILE = REPO / "docker-compose.yml"
ENV_EXAMPLE = REPO / ".env.example"
COMPOSE_SCHEMA = REPO / "tests/schemas/compose-spec.json"
COLLECTOR_CONFIG = REPO / "collector/otel-collector/config.yaml"
TEMPO_CONFIG = REPO / "collector/tempo/tempo.yaml"
LOKI_CONFIG = REPO / "collector/loki/loki.yaml"
PROMETHEUS_CONFIG = REPO / "collector/prometheus/prometheus.yml"
ALERTMANAGER_CONFIG = REPO / "collector/alertmanager/alertmanager.yml"
DATASOURCES = REPO / "dashboards/provisioning/datasources/datasources.yaml"
DASHBOARD_PROVIDERS = REPO / "dashboards/provisioning/dashboards/dashboards.yaml"
DASHBOARDS_DIR = REPO / "dashboards/json"

# What a user puts in .env: the two secrets compose requires.
TEST_ENV = {"GRAFANA_ADMIN_PASSWORD": "test-password", "DEMO_ADMIN_TOKEN": "test-token"}

CORE_PROFILE = frozenset({"redis", "web", "worker", "beat", "load", "prometheus", "grafana"})
INIT_SERVICES = frozenset({"healthcheck-tools"})

# Component type names of otelcol-contrib 0.136.0 (image otel/opentelemetry-collector-contrib:0.136.0).
# Modules: open-telemetry/opentelemetry-collector-releases, distributions/otelcol-contrib/manifest.yaml
# at commit 008cde8ca78cc0286ee3f0de92fa95e1641a445a (every gomod at v0.136.0). Each module's type
# name was read from its metadata.yaml (`type:`) or its generated internal/metadata/generated_status.go
# in open-telemetry/opentelemetry-collector(-contrib). Where a later release renamed a type to
# snake case (hostmetrics -> host_metrics, k8sattributes -> k8s_attributes, spanmetrics ->
# span_metrics, otlpjson -> otlp_json, cgroupruntime -> cgroup_runtime, otlphttp -> otlp_http in
# v0.144.0), the name 0.136.0 uses is listed: the later metadata keeps it as the deprecated alias.
# Processors: all 28 of the manifest. Receivers, exporters, extensions and connectors: the
# modules checked (the plausible ones for this stack), not every module of the manifest.
OTELCOL_CONTRIB_0_136_0: dict[str, frozenset[str]] = {
    "receivers": frozenset(
        {
            "docker_stats",
            "filelog",
            "fluentforward",
            "hostmetrics",
            "httpcheck",
            "jaeger",
            "journald",
            "kafka",
            "kubeletstats",
            "loki",
            "nop",
            "otlp",
            "otlpjsonfile",
            "postgresql",
            "prometheus",
            "prometheus_simple",
            "receiver_creator",
            "redis",
            "statsd",
            "syslog",
            "zipkin",
        }
    ),
    "processors": frozenset(
        {
            "attributes",
            "batch",
            "coralogix",
            "cumulativetodelta",
            "deltatocumulative",
            "deltatorate",
            "experimental_metricsgeneration",
            "filter",
            "geoip",
            "groupbyattrs",
            "groupbytrace",
            "interval",
            "isolationforest",
            "k8sattributes",
            "logdedup",
            "memory_limiter",
            "metricstarttime",
            "metricstransform",
            "probabilistic_sampler",
            "redaction",
            "remotetap",
            "resource",
            "resourcedetection",
            "schema",
            "span",
            "sumologic",
            "tail_sampling",
            "transform",
        }
    ),
    "exporters": frozenset(
        {
            "awss3",
            "clickhouse",
            "debug",
            "elasticsearch",
            "file",
            "influxdb",
            "kafka",
            "loadbalancing",
            "nop",
            "opensearch",
            "otelarrow",
            "otlp",
            "otlphttp",
            "prometheus",
            "prometheusremotewrite",
            "splunk_hec",
            "zipkin",
        }
    ),
    "extensions": frozenset(
        {
            "basicauth",
            "bearertokenauth",
            "cgroupruntime",
            "db_storage",
            "docker_observer",
            "file_storage",
            "headers_setter",
            "health_check",
            "host_observer",
            "http_forwarder",
            "jaegerremotesampling",
            "k8s_observer",
            "oauth2client",
            "oidc",
            "opamp",
            "pprof",
            "sigv4auth",
            "zpages",
        }
    ),
    "connectors": frozenset(
        {
            "count",
            "datadog",
            "exceptions",
            "failover",
            "forward",
            "grafanacloud",
            "otlpjson",
            "roundrobin",
            "routing",
            "servicegraph",
            "signaltometrics",
            "spanmetrics",
            "sum",
        }
    ),
}

# Data source uids Grafana provides itself (the "-- Grafana --", "-- Mixed --" and "-- Dashboard --" sources).
GRAFANA_BUILTIN_DATASOURCE_UIDS = frozenset({"grafana", "-- Grafana --", "-- Mixed --", "-- Dashboard --"})


# ---------------------------------------------------------------------------------------------
# Compose interpolation (https://github.com/compose-spec/compose-spec/blob/main/12-interpolation.md)


class InterpolationError(ValueError):
    """A `${VAR:?message}` whose variable is missing, or a malformed `$` expression."""


_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def interpolate(text: str, env: Mapping[str, str]) -> str:
    """Substitute `$VAR`, `${VAR}`, `${VAR:-default}`, `${VAR-default}`, `${VAR:?err}`, `${VAR?err}`,
    `${VAR:+alt}`, `${VAR+alt}` and `$$` in one string as compose does (defaults may nest).
    """
    out: list[str] = []
    i = 0
    while i < len(text):
        char = text[i]
        if char != "$":
            out.append(char)
            i += 1
            continue
        following = text[i + 1 : i + 2]
        if following == "$":
            out.append("$")
            i += 2
        elif following == "{":
            end = _closing_brace(text, i + 2)
            out.append(_substitute(text[i + 2 : end], env))
            i = end + 1
        else:
            name = _NAME.match(text, i + 1)
            if name is None:
                raise InterpolationError(f"invalid interpolation format in {text!r}")
            out.append(env.get(name.group(), ""))
            i = name.end()
    return "".join(out)


def _closing_brace(text: str, start: int) -> int:
    depth = 1
    i = start
    while i < len(text):
        if text.startswith("${", i):
            depth += 1
            i += 2
            continue
        if text[i] == "}":
            depth -= 1
            if depth == 0:
                return i
        i += 1
    raise InterpolationError(f"unclosed '${{' in {text!r}")


def _substitute(expression: str, env: Mapping[str, str]) -> str:
    name_match = _NAME.match(expression)
    if name_match is None:
        raise InterpolationError(f"invalid interpolation format: ${{{expression}}}")
    name, rest = name_match.group(), expression[name_match.end() :]
    value = env.get(name)
    for operator in (":-", ":?", ":+", "-", "?", "+"):
        if rest.startswith(operator):
            argument = rest[len(operator) :]
            break
    else:
        if rest:
            raise InterpolationError(f"invalid interpolation format: ${{{expression}}}")
        return value or ""
    unset_or_empty = not value
    missing = unset_or_empty if operator.startswith(":") else value is None
    if operator.endswith("-"):
        return interpolate(argument, env) if missing else str(value)
    if operator.endswith("?"):
        if missing:
            raise InterpolationError(f"required variable {name} is missing a value: {interpolate(argument, env)}")
        return str(value)
    return "" if missing else interpolate(argument, env)


def interpolate_tree(node: Any, env: Mapping[str, str]) -> Any:
    """Interpolate every string value of a parsed compose file (keys are left alone, as compose does)."""
    if isinstance(node, dict):
        return {key: interpolate_tree(value, env) for key, value in node.items()}
    if isinstance(node, list):
        return [interpolate_tree(item, env) for item in node]
    if isinstance(node, str):
        return interpolate(node, env)
    return node


def load_compose(env: Mapping[str, str] = TEST_ENV) -> dict[str, Any]:
    """docker-compose.yml as compose sees it: YAML anchors and merges resolved, then interpolated."""
    return interpolate_tree(yaml.safe_load(COMPOSE_FILE.read_text()), env)


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return load_compose()


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return compose["services"]


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


# ---------------------------------------------------------------------------------------------
# Helpers about services


def depends_on(service: Mapping[str, Any]) -> dict[str, Any]:
    """The service's dependencies in the long form (a list form maps to no condition)."""
    deps = service.get("depends_on") or {}
    if isinstance(deps, list):
        return {name: {} for name in deps}
    return dict(deps)


def published_ports(service: Mapping[str, Any]) -> list[tuple[str | None, str | None, int]]:
    """(host ip, published port, container port) of each `ports` entry, short or long syntax."""
    result: list[tuple[str | None, str | None, int]] = []
    for entry in service.get("ports") or []:
        if isinstance(entry, dict):
            result.append((entry.get("host_ip"), str(entry.get("published")), int(entry["target"])))
            continue
        spec = str(entry).split("/")[0]
        parts = spec.rsplit(":", 2) if spec.count(":") >= 2 else [None, *spec.split(":")]
        if len(parts) == 2:  # container port only
            parts = [None, None, parts[1]]
        host_ip, published, target = parts
        result.append((host_ip, published, int(target)))
    return result


def listening_ports(service: Mapping[str, Any]) -> set[int]:
    """Ports the service's container listens on, as declared: published targets and `expose`."""
    ports = {target for _, _, target in published_ports(service)}
    ports |= {int(str(port).split("/")[0]) for port in service.get("expose") or []}
    return ports


def parse_bytes(size: str | int) -> int:
    """Compose's byte values (`256m`, `1g`, `512k`, plain numbers)."""
    match = re.fullmatch(r"(\d+)\s*([bkmg]?)i?b?", str(size).strip().lower())
    assert match, f"not a byte value: {size!r}"
    return int(match.group(1)) * {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}[match.group(2)]


def host_port(address: str) -> tuple[str, int]:
    """`host:port` or a URL with an explicit or scheme-default port."""
    if "://" not in address:
        address = "tcp://" + address
    parts = urlsplit(address)
    port = parts.port or {"http": 80, "https": 443}.get(parts.scheme)
    assert parts.hostname and port, f"no host and port in {address!r}"
    return parts.hostname, port


def assert_reaches(services: Mapping[str, Mapping[str, Any]], address: str, *, source: str, itself: str = "") -> None:
    """`address` names a compose service (`localhost` is `itself`) on a port that service listens on."""
    host, port = host_port(address)
    target = itself if host in ("localhost", "127.0.0.1") and itself else host
    assert target in services, f"{source} points at {address}, but compose has no service {target!r}"
    assert port in listening_ports(services[target]), (
        f"{source} points at {address}, but {target} listens on {sorted(listening_ports(services[target]))}"
    )


# ---------------------------------------------------------------------------------------------
# docker-compose.yml


def test_interpolation_follows_compose_rules() -> None:
    """Defaults, required variables and `$$` are substituted as compose substitutes them, so the checks
    below see the values `docker compose` would use.
    """
    env = {"SET": "value", "EMPTY": ""}
    assert interpolate("${SET:-d} ${UNSET:-d} ${EMPTY:-d} ${EMPTY-d}", env) == "value d d "
    assert interpolate("${UNSET:-${SET}} $SET $$HOME ${SET:+alt} ${UNSET:+alt}", env) == "value value $HOME alt "
    with pytest.raises(InterpolationError, match="required variable EMPTY is missing a value: say so"):
        interpolate("${EMPTY:?say so}", env)
    assert interpolate("${EMPTY?say so}", env) == ""
    with pytest.raises(InterpolationError):
        interpolate("${SET", env)


def test_compose_file_follows_the_compose_specification(compose: dict[str, Any]) -> None:
    """docker-compose.yml (interpolated) validates against the Compose Specification JSON schema,
    so `docker compose` will not reject a key or a value type.
    """
    schema = json.loads(COMPOSE_SCHEMA.read_text())
    validator = jsonschema.Draft7Validator(schema)
    errors = [f"{'/'.join(map(str, error.absolute_path))}: {error.message}" for error in validator.iter_errors(compose)]
    assert not errors, "\n".join(errors)


def test_schema_check_catches_a_misspelt_key(compose: dict[str, Any]) -> None:
    """The schema check is not vacuous: a misspelt service key and a wrong depends_on condition fail it."""
    validator = jsonschema.Draft7Validator(json.loads(COMPOSE_SCHEMA.read_text()))
    broken = json.loads(json.dumps(compose))
    broken["services"]["web"]["mem_limt"] = "256m"
    assert not validator.is_valid(broken)
    broken = json.loads(json.dumps(compose))
    broken["services"]["web"]["depends_on"]["redis"]["condition"] = "service_ready"
    assert not validator.is_valid(broken)


@pytest.mark.parametrize("profile", ["core", "full"])
def test_docker_compose_accepts_each_profile(profile: str) -> None:
    """Docker Compose itself (v2, `make compose-cli` installs it; no engine needed) accepts the file
    with each profile: `config --quiet` fails on unknown keys, bad interpolation and on a dependency
    that the active profile leaves out without `required: false`.
    """
    command = _compose_command()
    env = {**os.environ, **TEST_ENV, "COMPOSE_PROFILES": profile}
    result = subprocess.run(
        [
            *command,
            "-f",
            str(COMPOSE_FILE),
            "--project-directory",
            str(REPO),
            "--env-file",
            os.devnull,
            "config",
            "--quiet",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr


def _compose_command() -> list[str]:
    """SPYGLASS_DOCKER_COMPOSE, else the Docker Compose binary `make compose-cli` puts in the venv."""
    if explicit := os.environ.get("SPYGLASS_DOCKER_COMPOSE"):
        return [explicit]
    installed = Path(sys.executable).parent / "docker-compose"
    assert installed.exists(), "no Docker Compose binary: run `make compose-cli` (make test does)"
    return [str(installed)]


def test_every_image_is_pinned_to_a_full_version(services: dict[str, dict[str, Any]]) -> None:
    """Every image has an exact version tag (major.minor.patch), so `docker compose up` next year runs
    what the configs were checked against; no `latest`, no bare major or minor tags.
    """
    pinned = re.compile(r"[a-z0-9./-]+:v?\d+\.\d+\.\d+(-[a-z0-9.-]+)?")
    for name, service in services.items():
        assert pinned.fullmatch(service["image"]), f"{name}: image {service['image']!r} is not pinned"


def test_every_long_running_service_has_a_healthcheck(services: dict[str, dict[str, Any]]) -> None:
    """Every service except the one-shot init steps reports its health, so `depends_on: service_healthy`
    and `docker compose ps` mean something; the init steps run once and are never restarted.
    """
    for name, service in services.items():
        check = service.get("healthcheck")
        if name in INIT_SERVICES:
            assert check is None, name
            assert service.get("restart") == "no", name
            continue
        assert check, f"{name} has no healthcheck"
        assert not check.get("disable"), name
        assert check["test"][0] in ("CMD", "CMD-SHELL"), f"{name}: {check['test']}"


def test_healthchecks_ask_the_port_the_service_listens_on(services: dict[str, dict[str, Any]]) -> None:
    """A healthcheck URL on 127.0.0.1 names a port the container listens on, so a healthy status means
    the service itself answers (a wrong port would keep it unhealthy forever).
    """
    for name, service in services.items():
        for argument in (service.get("healthcheck") or {}).get("test", []):
            for url in re.findall(r"https?://[^\s'\"]+", argument):
                assert_reaches(services, url, source=f"{name} healthcheck", itself=name)


def test_every_dependency_waits_for_a_condition(services: dict[str, dict[str, Any]]) -> None:
    """Every depends_on names a condition: service_healthy on services with a healthcheck, and
    service_completed_successfully on the init steps, so nothing starts before what it needs works.
    """
    for name, service in services.items():
        for target, spec in depends_on(service).items():
            assert target in services, f"{name} depends on unknown service {target}"
            condition = spec.get("condition")
            if target in INIT_SERVICES:
                assert condition == "service_completed_successfully", f"{name} -> {target}: {condition}"
            else:
                assert condition == "service_healthy", f"{name} -> {target}: {condition}"
                assert services[target].get("healthcheck"), f"{name} waits for {target}, which has no healthcheck"


def test_every_service_has_a_memory_limit(services: dict[str, dict[str, Any]]) -> None:
    """Every container has mem_limit, so one runaway service cannot take the machine's memory."""
    for name, service in services.items():
        assert "mem_limit" in service, f"{name} has no mem_limit"
        assert parse_bytes(service["mem_limit"]) >= 8 << 20, name


def _limiter_bytes(limiter: Mapping[str, int], setting: str, container: int) -> int:
    """memory_limiter's `<setting>_mib` (which wins) or `<setting>_percentage` of the container's memory."""
    if f"{setting}_mib" in limiter:
        return limiter[f"{setting}_mib"] << 20
    return container * limiter[f"{setting}_percentage"] // 100


def test_collector_memory_limiter_fits_its_container(services: dict[str, dict[str, Any]]) -> None:
    """The Collector's memory_limiter refuses data below its container's limit and Go's soft limit
    (GOMEMLIMIT) sits below memory_limiter's hard limit, so the Collector sheds load instead of being
    killed by the kernel.
    """
    limiter = load_yaml(COLLECTOR_CONFIG)["processors"]["memory_limiter"]
    container = parse_bytes(services["otel-collector"]["mem_limit"])
    hard = _limiter_bytes(limiter, "limit", container)
    spike = _limiter_bytes(limiter, "spike_limit", container)
    assert 0 < spike < hard <= container * 9 // 10
    gomemlimit = services["otel-collector"].get("environment", {}).get("GOMEMLIMIT")
    if gomemlimit:
        assert parse_bytes(gomemlimit.replace("MiB", "m").replace("GiB", "g")) <= hard


def test_published_ports_are_overridable_and_do_not_clash() -> None:
    """Each host port comes from a variable of .env.example (`${X_PORT:-default}`), so a user whose port
    is taken changes one line; the defaults do not collide with each other.
    """
    raw = yaml.safe_load(COMPOSE_FILE.read_text())
    example = dict(re.findall(r"^([A-Z_]+)=(.*)$", ENV_EXAMPLE.read_text(), re.MULTILINE))
    defaults: dict[str, str] = {}
    for name, service in raw["services"].items():
        for entry in service.get("ports") or []:
            match = re.fullmatch(r"127\.0\.0\.1:\$\{([A-Z_]+):-(\d+)\}:\d+", str(entry))
            assert match, f"{name}: port {entry!r} is not 127.0.0.1:${{VAR:-default}}:port"
            variable, default = match.groups()
            assert example.get(variable) == default, f"{variable} missing from .env.example or not {default}"
            defaults[variable] = default
    assert len(set(defaults.values())) == len(defaults), defaults


def test_env_example_sets_every_variable_compose_reads() -> None:
    """.env.example names every variable docker-compose.yml reads (so it documents them all), chooses the
    full profile, and leaves the secrets empty for the user (or `make stack-env`) to fill.
    """
    used = set(re.findall(r"\$\{([A-Z_][A-Z0-9_]*)", COMPOSE_FILE.read_text()))
    example = dict(re.findall(r"^([A-Z_][A-Z0-9_]*)=(.*)$", ENV_EXAMPLE.read_text(), re.MULTILINE))
    assert used - set(example) == set(), used - set(example)
    assert example["COMPOSE_PROFILES"] == "full"
    assert example["GRAFANA_ADMIN_PASSWORD"] == ""
    assert example["DEMO_ADMIN_TOKEN"] == ""


def test_profiles_core_and_full(services: dict[str, dict[str, Any]]) -> None:
    """Every service lists its profiles: `core` is exactly the shop, Prometheus and Grafana, and `full`
    runs everything, so `COMPOSE_PROFILES=core` is the small stack and `full` the whole one.
    """
    for name, service in services.items():
        assert service.get("profiles"), f"{name} has no profiles"
        assert "full" in service["profiles"], name
        assert set(service["profiles"]) <= {"core", "full"}, name
    core = {name for name, service in services.items() if "core" in service["profiles"]}
    assert core == CORE_PROFILE


@pytest.mark.parametrize("profile", ["core", "full"])
def test_dependencies_outside_a_profile_are_optional(services: dict[str, dict[str, Any]], profile: str) -> None:
    """A service of a profile depends on a service left out of that profile only with `required: false`:
    compose refuses the whole project otherwise ("depends on undefined service").
    """
    active = {name for name, service in services.items() if profile in service["profiles"]}
    for name in active:
        for target, spec in depends_on(services[name]).items():
            if target not in active:
                assert spec.get("required") is False, f"{profile}: {name} requires {target}, which is not in {profile}"


def test_bind_mounts_exist_and_named_volumes_are_declared(compose: dict[str, Any]) -> None:
    """Every file or directory compose mounts from the repository exists (a missing one would be created
    as an empty directory and the service would start without its config), and every named volume is
    declared.
    """
    declared = set(compose.get("volumes") or {})
    for name, service in compose["services"].items():
        for volume in service.get("volumes") or []:
            source = volume["source"] if isinstance(volume, dict) else str(volume).split(":")[0]
            if source.startswith((".", "/")):
                assert (REPO / source).exists(), f"{name} mounts {source}, which does not exist"
            else:
                assert source in declared, f"{name} uses undeclared volume {source}"


def test_configs_are_mounted_where_the_services_read_them(services: dict[str, dict[str, Any]]) -> None:
    """Each service's config file is mounted at the path its command line reads."""
    expected = {
        "otel-collector": ("./collector/otel-collector/config.yaml", "--config="),
        "tempo": ("./collector/tempo/tempo.yaml", "-config.file="),
        "loki": ("./collector/loki/loki.yaml", "-config.file="),
        "prometheus": ("./collector/prometheus/prometheus.yml", "--config.file="),
        "alertmanager": ("./collector/alertmanager/alertmanager.yml", "--config.file="),
    }
    for name, (source, flag) in expected.items():
        mounts = dict(str(volume).split(":")[:2] for volume in services[name]["volumes"])
        assert source in mounts, f"{name} does not mount {source}"
        flags = [argument for argument in services[name]["command"] if argument.startswith(flag)]
        assert flags == [flag + mounts[source]], f"{name} reads {flags}, mounted at {mounts[source]}"
    grafana = dict(str(volume).split(":")[:2] for volume in services["grafana"]["volumes"])
    assert grafana["./dashboards/provisioning/datasources"] == "/etc/grafana/provisioning/datasources"
    assert grafana["./dashboards/provisioning/dashboards"] == "/etc/grafana/provisioning/dashboards"
    provider = load_yaml(DASHBOARD_PROVIDERS)["providers"][0]
    assert grafana["./dashboards/json"] == provider["options"]["path"]
    prometheus = dict(str(volume).split(":")[:2] for volume in services["prometheus"]["volumes"])
    rule_globs = load_yaml(PROMETHEUS_CONFIG)["rule_files"]
    assert all(glob.startswith("rules/") for glob in rule_globs)
    assert prometheus["./collector/prometheus/rules"] == "/etc/prometheus/rules"


def test_apps_send_telemetry_to_the_collector(services: dict[str, dict[str, Any]]) -> None:
    """The shop's processes have their service names and export OTLP/HTTP to the Collector's 4318, and
    serve metrics on 9464 on every interface so Prometheus can scrape them.
    """
    names = {"web": "shop-web", "worker": "shop-worker", "beat": "shop-beat"}
    for name, service_name in names.items():
        environment = services[name]["environment"]
        assert environment["OTEL_SERVICE_NAME"] == service_name
        assert environment["SPYGLASS_METRICS_HOST"] == "0.0.0.0"
        assert environment["SPYGLASS_METRICS_PORT"] == "9464"
        assert "SPYGLASS_TRACES_FILE" not in environment
        assert_reaches(services, environment["OTEL_EXPORTER_OTLP_ENDPOINT"], source=f"{name} OTLP endpoint")
        assert host_port(environment["OTEL_EXPORTER_OTLP_ENDPOINT"]) == ("otel-collector", 4318)


# ---------------------------------------------------------------------------------------------
# Addresses in the configs


def prometheus_targets(config: Mapping[str, Any]) -> Iterator[tuple[str, str]]:
    """(job, host:port) of every static and DNS-discovered scrape target, and the Alertmanagers."""
    for job in config.get("scrape_configs", []):
        for static in job.get("static_configs", []):
            for target in static.get("targets", []):
                yield job["job_name"], target
        for dns in job.get("dns_sd_configs", []):
            for name in dns["names"]:
                yield job["job_name"], f"{name}:{dns['port']}"
    for alertmanager in config.get("alerting", {}).get("alertmanagers", []):
        for static in alertmanager.get("static_configs", []):
            for target in static.get("targets", []):
                yield "alerting", target


def test_prometheus_targets_are_compose_services(services: dict[str, dict[str, Any]]) -> None:
    """Every target Prometheus scrapes or alerts to is a compose service on a port it listens on
    (`localhost` is Prometheus itself), so no job is down by design.
    """
    targets = list(prometheus_targets(load_yaml(PROMETHEUS_CONFIG)))
    assert {"web:9464", "worker:9464", "beat:9464", "otel-collector:8888"} <= {target for _, target in targets}
    for job, target in targets:
        assert_reaches(services, target, source=f"prometheus job {job}", itself="prometheus")


def test_alertmanager_webhooks_reach_the_alert_sink(services: dict[str, dict[str, Any]]) -> None:
    """Alertmanager's webhook receivers post to the alert-sink service on the port it listens on."""
    receivers = load_yaml(ALERTMANAGER_CONFIG)["receivers"]
    urls = [hook["url"] for receiver in receivers for hook in receiver.get("webhook_configs", [])]
    assert urls
    for url in urls:
        assert host_port(url)[0] == "alert-sink"
        assert_reaches(services, url, source="alertmanager webhook")


def test_collector_exporters_and_ports_match_compose(services: dict[str, dict[str, Any]]) -> None:
    """The Collector exports to Tempo's OTLP gRPC port and Loki's HTTP port, and listens (receivers,
    own metrics, health check) on exactly the ports compose publishes or exposes for it.
    """
    config = load_yaml(COLLECTOR_CONFIG)
    exporters = config["exporters"]
    assert host_port(exporters["otlp/tempo"]["endpoint"]) == ("tempo", 4317)
    assert exporters["otlp/tempo"]["tls"]["insecure"] is True
    assert urlsplit(exporters["otlphttp/loki"]["endpoint"]).path == "/otlp"
    for name, exporter in exporters.items():
        assert_reaches(services, exporter["endpoint"], source=f"collector exporter {name}")
    protocols = config["receivers"]["otlp"]["protocols"]
    own = {host_port(protocols[protocol]["endpoint"]) for protocol in ("grpc", "http")}
    own.add(host_port(config["extensions"]["health_check"]["endpoint"]))
    prometheus = config["service"]["telemetry"]["metrics"]["readers"][0]["pull"]["exporter"]["prometheus"]
    own.add((prometheus["host"], prometheus["port"]))
    assert {host for host, _ in own} == {"0.0.0.0"}, "the Collector must listen beyond its own container"
    assert {port for _, port in own} == listening_ports(services["otel-collector"])


def test_tempo_listens_where_compose_and_the_collector_expect(services: dict[str, dict[str, Any]]) -> None:
    """Tempo's OTLP gRPC receiver binds 0.0.0.0:4317 (Tempo 2.7+ binds localhost by default, unreachable
    from the Collector), its HTTP API is 3200, and the metrics generator remote-writes to Prometheus's
    remote-write receiver with exemplars, for the service map and span metrics.
    """
    config = load_yaml(TEMPO_CONFIG)
    grpc = config["distributor"]["receivers"]["otlp"]["protocols"]["grpc"]["endpoint"]
    assert grpc == "0.0.0.0:4317"
    assert config["server"]["http_listen_port"] == 3200
    assert listening_ports(services["tempo"]) == {3200, 4317}
    remote_writes = config["metrics_generator"]["storage"]["remote_write"]
    for remote_write in remote_writes:
        assert urlsplit(remote_write["url"]).path == "/api/v1/write"
        assert remote_write["send_exemplars"] is True
        assert_reaches(services, remote_write["url"], source="tempo remote_write")
    assert "--web.enable-remote-write-receiver" in services["prometheus"]["command"]
    assert "--enable-feature=exemplar-storage" in services["prometheus"]["command"]
    processors = config["overrides"]["defaults"]["metrics_generator"]["processors"]
    assert set(processors) >= {"service-graphs", "span-metrics"}
    assert config["storage"]["trace"]["backend"] == "local"
    assert config["storage"]["trace"]["local"]["path"].startswith("/var/tempo/")
    assert any(str(volume).endswith(":/var/tempo") for volume in services["tempo"]["volumes"])


def test_loki_accepts_otlp_with_structured_metadata(services: dict[str, dict[str, Any]]) -> None:
    """Loki runs single-tenant on 3100 with a tsdb/v13 schema and structured metadata allowed: the two
    things its OTLP endpoint needs to keep a log record's trace_id (the log -> trace link).
    """
    config = load_yaml(LOKI_CONFIG)
    assert config["auth_enabled"] is False
    assert config["server"]["http_listen_port"] == 3100
    assert listening_ports(services["loki"]) == {3100}
    assert config["limits_config"].get("allow_structured_metadata", True) is not False
    latest_schema = max(config["schema_config"]["configs"], key=lambda period: str(period["from"]))
    assert (latest_schema["store"], latest_schema["schema"]) == ("tsdb", "v13")
    assert config["common"]["replication_factor"] == 1
    assert config["common"]["ring"]["kvstore"]["store"] == "inmemory"
    assert config["common"]["path_prefix"] == "/loki"
    assert any(str(volume).endswith(":/loki") for volume in services["loki"]["volumes"])


def test_grafana_datasources_reach_their_services(services: dict[str, dict[str, Any]]) -> None:
    """Every Grafana data source URL is a compose service on a port it listens on."""
    for source in load_yaml(DATASOURCES)["datasources"]:
        assert_reaches(services, source["url"], source=f"grafana data source {source['uid']}")


# ---------------------------------------------------------------------------------------------
# Collector configuration structure

PIPELINE_KINDS = ("receivers", "processors", "exporters")


def component_type(component_id: str) -> str:
    """`otlphttp/loki` -> `otlphttp`."""
    return component_id.split("/", 1)[0]


def collector_config_problems(config: Mapping[str, Any], known: Mapping[str, frozenset[str]]) -> list[str]:
    """What the Collector would reject or what this stack forbids: components named in a pipeline but not
    defined, components defined but unused, memory_limiter not first or batch not last in a pipeline,
    component types the release does not provide.
    """
    problems: list[str] = []
    defined = {kind: set(config.get(kind) or {}) for kind in (*PIPELINE_KINDS, "connectors", "extensions")}
    for kind, ids in defined.items():
        for component_id in ids:
            if component_type(component_id) not in known[kind]:
                problems.append(f"{kind[:-1]} type {component_type(component_id)!r} is not in the pinned release")
    service = config.get("service") or {}
    used: dict[str, set[str]] = {kind: set() for kind in defined}
    for extension in service.get("extensions") or []:
        used["extensions"].add(extension)
        if extension not in defined["extensions"]:
            problems.append(f"service.extensions names undefined extension {extension!r}")
    pipelines = service.get("pipelines") or {}
    if not pipelines:
        problems.append("no pipelines")
    for pipeline_id, pipeline in pipelines.items():
        for kind in PIPELINE_KINDS:
            for component_id in pipeline.get(kind) or []:
                # A connector is an exporter of one pipeline and a receiver of another.
                if kind != "processors" and component_id in defined["connectors"]:
                    used["connectors"].add(component_id)
                    continue
                used[kind].add(component_id)
                if component_id not in defined[kind]:
                    problems.append(f"pipeline {pipeline_id} names undefined {kind[:-1]} {component_id!r}")
        processors = [component_type(p) for p in pipeline.get("processors") or []]
        if not processors or processors[0] != "memory_limiter":
            problems.append(f"pipeline {pipeline_id}: memory_limiter is not the first processor")
        if not processors or processors[-1] != "batch":
            problems.append(f"pipeline {pipeline_id}: batch is not the last processor")
        for kind in ("receivers", "exporters"):
            if not pipeline.get(kind):
                problems.append(f"pipeline {pipeline_id} has no {kind}")
    for kind, ids in defined.items():
        for component_id in sorted(ids - used[kind]):
            problems.append(f"{kind[:-1]} {component_id!r} is defined but not used")
    return problems


def test_collector_config_is_consistent() -> None:
    """The Collector starts with this configuration and does what the stack needs: every component is
    defined, used and provided by otelcol-contrib 0.136.0; memory_limiter comes first and batch last in
    every pipeline; traces go to Tempo and logs to Loki.
    """
    config = load_yaml(COLLECTOR_CONFIG)
    assert collector_config_problems(config, OTELCOL_CONTRIB_0_136_0) == []
    pipelines = config["service"]["pipelines"]
    assert pipelines["traces"]["exporters"] == ["otlp/tempo"]
    assert pipelines["logs"]["exporters"] == ["otlphttp/loki"]
    assert "metrics" not in pipelines


def test_collector_environment_default_uses_the_env_provider() -> None:
    """The resource processor stamps deployment.environment.name from DEPLOYMENT_ENVIRONMENT with the
    env provider's default syntax, and compose passes the variable to the Collector.
    """
    attributes = load_yaml(COLLECTOR_CONFIG)["processors"]["resource"]["attributes"]
    assert attributes == [
        {
            "key": "deployment.environment.name",
            "value": "${env:DEPLOYMENT_ENVIRONMENT:-compose}",
            "action": "upsert",
        }
    ]
    raw = yaml.safe_load(COMPOSE_FILE.read_text())
    assert "DEPLOYMENT_ENVIRONMENT" in raw["services"]["otel-collector"]["environment"]


def _minimal_collector_config() -> dict[str, Any]:
    return {
        "receivers": {"otlp": {}},
        "processors": {"memory_limiter": {}, "batch": {}},
        "exporters": {"otlphttp/loki": {}},
        "extensions": {"health_check": {}},
        "service": {
            "extensions": ["health_check"],
            "pipelines": {
                "logs": {
                    "receivers": ["otlp"],
                    "processors": ["memory_limiter", "batch"],
                    "exporters": ["otlphttp/loki"],
                }
            },
        },
    }


def test_collector_checker_rejects_broken_configs() -> None:
    """The checker above is not vacuous: it accepts a minimal correct config and rejects the removed
    `loki` exporter, an undefined processor, an unused component and a misplaced memory_limiter.
    """
    assert collector_config_problems(_minimal_collector_config(), OTELCOL_CONTRIB_0_136_0) == []

    removed_exporter = _minimal_collector_config()
    removed_exporter["exporters"] = {"loki": {"endpoint": "http://loki:3100/loki/api/v1/push"}}
    removed_exporter["service"]["pipelines"]["logs"]["exporters"] = ["loki"]
    assert collector_config_problems(removed_exporter, OTELCOL_CONTRIB_0_136_0) == [
        "exporter type 'loki' is not in the pinned release"
    ]

    undefined = _minimal_collector_config()
    undefined["service"]["pipelines"]["logs"]["processors"] = ["memory_limiter", "resource", "batch"]
    assert collector_config_problems(undefined, OTELCOL_CONTRIB_0_136_0) == [
        "pipeline logs names undefined processor 'resource'"
    ]

    unused = _minimal_collector_config()
    unused["exporters"]["debug"] = {}
    assert collector_config_problems(unused, OTELCOL_CONTRIB_0_136_0) == ["exporter 'debug' is defined but not used"]

    misordered = _minimal_collector_config()
    misordered["service"]["pipelines"]["logs"]["processors"] = ["batch", "memory_limiter"]
    assert collector_config_problems(misordered, OTELCOL_CONTRIB_0_136_0) == [
        "pipeline logs: memory_limiter is not the first processor",
        "pipeline logs: batch is not the last processor",
    ]


# ---------------------------------------------------------------------------------------------
# Grafana provisioning


def walk(node: Any) -> Iterator[tuple[str, Any]]:
    """Every (key, value) pair in nested dicts and lists."""
    if isinstance(node, dict):
        for key, value in node.items():
            yield key, value
            yield from walk(value)
    elif isinstance(node, list):
        for item in node:
            yield from walk(item)


def grafana_expand(value: str, env: Mapping[str, str] | None = None) -> tuple[str, set[str]]:
    """A provisioning value as Grafana reads it: `$$` is a literal `$`, `$VAR` and `${VAR}` are replaced
    from the environment (Go's os.Expand). Returns the value and the variables it referenced.
    """
    env = env or {}
    referenced: set[str] = set()

    def replace(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        referenced.add(name)
        return env.get(name, "")

    parts = [re.sub(r"\$\{([^}]*)\}|\$([A-Za-z0-9_]+)", replace, part) for part in value.split("$$")]
    return "$".join(parts), referenced


def load_datasources() -> list[dict[str, Any]]:
    """The provisioned data sources with their string values expanded as Grafana expands them."""

    def expand(node: Any) -> Any:
        if isinstance(node, dict):
            return {key: expand(value) for key, value in node.items()}
        if isinstance(node, list):
            return [expand(item) for item in node]
        return grafana_expand(node)[0] if isinstance(node, str) else node

    return expand(load_yaml(DATASOURCES)["datasources"])


def test_datasource_uids_are_unique_and_references_resolve() -> None:
    """The provisioned data sources have unique fixed uids, Prometheus is the default, and every
    `datasourceUid` a link names (exemplars, traces to logs and metrics, service map, log to trace)
    is one of them: a dangling uid is a link that silently does nothing.
    """
    sources = load_yaml(DATASOURCES)["datasources"]
    uids = [source["uid"] for source in sources]
    assert len(uids) == len(set(uids)), uids
    assert set(uids) == {"prometheus", "tempo", "loki", "alertmanager"}
    assert [source["uid"] for source in sources if source.get("isDefault")] == ["prometheus"]
    referenced = [value for key, value in walk(sources) if key == "datasourceUid"]
    assert referenced, "no links between the data sources"
    assert set(referenced) <= set(uids), set(referenced) - set(uids)


def test_datasource_links_are_configured_for_the_stacks_labels() -> None:
    """The links use the names the stack produces: exemplar label trace_id, Loki's service_name label
    and trace_id structured metadata, Prometheus's job = service.name, and queries on spyglass's HTTP
    metric.
    """
    sources = {source["uid"]: source for source in load_datasources()}
    assert sources["prometheus"]["jsonData"]["exemplarTraceIdDestinations"] == [
        {"name": "trace_id", "datasourceUid": "tempo"}
    ]
    assert sources["prometheus"]["jsonData"]["httpMethod"] == "POST"
    tempo = sources["tempo"]["jsonData"]
    assert tempo["tracesToLogsV2"]["filterByTraceID"] is True
    assert {"key": "service.name", "value": "service_name"} in tempo["tracesToLogsV2"]["tags"]
    assert {"key": "service.name", "value": "job"} in tempo["tracesToMetrics"]["tags"]
    queries = [query["query"] for query in tempo["tracesToMetrics"]["queries"]]
    assert any("http_server_request_duration_seconds_count{" in query for query in queries)
    assert all("$__tags" in query for query in queries)
    assert tempo["serviceMap"]["datasourceUid"] == "prometheus"
    assert tempo["nodeGraph"]["enabled"] is True
    (derived,) = sources["loki"]["jsonData"]["derivedFields"]
    assert (derived["matcherType"], derived["matcherRegex"], derived["datasourceUid"]) == ("label", "trace_id", "tempo")
    assert derived["url"] == "${__value.raw}"
    assert sources["alertmanager"]["jsonData"]["implementation"] == "prometheus"


def test_datasources_file_escapes_every_dollar() -> None:
    """Grafana expands `$VAR` and `${VAR}` in provisioning files from its environment, so every Grafana
    variable (`${__value.raw}`, `$__tags`) is written `$$`: a single `$` would be replaced by an empty
    environment variable and break the link.
    """
    strings = [value for _, value in walk(load_yaml(DATASOURCES)) if isinstance(value, str)]
    assert any("$$" in value for value in strings)
    for value in strings:
        assert grafana_expand(value)[1] == set(), f"Grafana would substitute environment variables in {value!r}"
    assert grafana_expand("$${__value.raw} ${HOME} $__tags") == ("${__value.raw}  ", {"HOME", "__tags"})


def dashboard_datasource_problems(dashboard: Mapping[str, Any], known: set[str]) -> list[str]:
    """Data source references of a dashboard JSON that do not resolve: a uid that is not provisioned, or
    a template variable (`${name}`, `$name`) the dashboard does not define.
    """
    variables = {variable.get("name") for variable in (dashboard.get("templating") or {}).get("list", [])}
    problems = []
    for key, value in walk(dashboard):
        if key != "datasource" or value is None:
            continue
        uid = value.get("uid") if isinstance(value, dict) else value
        if uid is None:
            continue
        variable = re.fullmatch(r"\$\{?(\w+)(?::\w+)?\}?", str(uid))
        if variable:
            if variable.group(1) not in variables:
                problems.append(f"data source variable {uid} is not a templating variable")
        elif uid not in known and uid not in GRAFANA_BUILTIN_DATASOURCE_UIDS:
            problems.append(f"data source uid {uid!r} is not provisioned")
    return problems


def test_dashboards_reference_provisioned_datasources() -> None:
    """Every data source a dashboard under dashboards/json names is provisioned (or a variable of the
    dashboard), so no panel opens on "data source not found".
    """
    known = {source["uid"] for source in load_yaml(DATASOURCES)["datasources"]}
    known |= {source["name"] for source in load_yaml(DATASOURCES)["datasources"]}
    for path in sorted(DASHBOARDS_DIR.rglob("*.json")):
        problems = dashboard_datasource_problems(json.loads(path.read_text()), known)
        assert not problems, f"{path.relative_to(REPO)}: {problems}"


def test_dashboard_checker_catches_missing_uids() -> None:
    """The dashboard check is not vacuous: an unknown uid and an undefined variable are reported; known
    uids, defined variables and Grafana's built-in sources are not.
    """
    dashboard = {
        "templating": {"list": [{"name": "datasource", "type": "datasource", "query": "prometheus"}]},
        "annotations": {"list": [{"datasource": {"type": "grafana", "uid": "-- Grafana --"}}]},
        "panels": [
            {"datasource": {"type": "prometheus", "uid": "prometheus"}},
            {"datasource": {"type": "prometheus", "uid": "${datasource}"}},
            {"targets": [{"datasource": {"type": "loki", "uid": "loki-old"}}]},
            {"datasource": {"uid": "$missing"}},
        ],
    }
    assert dashboard_datasource_problems(dashboard, {"prometheus", "tempo", "loki"}) == [
        "data source uid 'loki-old' is not provisioned",
        "data source variable $missing is not a templating variable",
    ]


def test_dashboard_provider_loads_the_json_folder() -> None:
    """Grafana loads the dashboards of dashboards/json into the folder "spyglass" and refuses UI edits,
    so the files in the repository stay the source of truth.
    """
    (provider,) = load_yaml(DASHBOARD_PROVIDERS)["providers"]
    assert provider["type"] == "file"
    assert provider["folder"] == "spyglass"
    assert provider["allowUiUpdates"] is False
    assert provider["options"] == {"path": "/var/lib/grafana/dashboards", "foldersFromFilesStructure": False}


# ---------------------------------------------------------------------------------------------
# Prometheus and Alertmanager


def test_promtool_accepts_the_prometheus_config() -> None:
    """`promtool check config` accepts collector/prometheus/prometheus.yml (and the rule files it loads)."""
    result = subprocess.run(["promtool", "check", "config", str(PROMETHEUS_CONFIG)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_amtool_accepts_the_alertmanager_config() -> None:
    """`amtool check-config` accepts collector/alertmanager/alertmanager.yml."""
    result = subprocess.run(["amtool", "check-config", str(ALERTMANAGER_CONFIG)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
