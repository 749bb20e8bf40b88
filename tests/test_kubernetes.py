"""The Kubernetes manifests (collector/kubernetes/) are generated, valid, and agree with the stack.

Validity is checked against the schemas of the kinds, compiled by the @kubernetes-models npm
packages (prometheus-operator's monitoring.coreos.com/v1 PodMonitor, ServiceMonitor and
PrometheusRule, Kubernetes' Service and Deployment, KEDA's ScaledObject), with unknown fields
refused through the packages' TypeScript types: tests/kubernetes_validator/validate.mjs, installed
by `make kubernetes-validator` (which `make test` runs) from its package-lock.json.
"""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from collector import kubernetes
from collector.kubernetes import (
    METRICS_PORT_NAME,
    NAME_LABEL,
    SELECTOR_LABELS,
    load_manifests,
    render_all,
)
from tests.conftest import REPO
from tests.test_stack_files import load_compose

VALIDATOR = REPO / "tests/kubernetes_validator"
RULES_DIR = REPO / "collector/prometheus/rules"
PAGE = REPO / "docs/scaling.md"
PROMETHEUS_CONFIG = REPO / "collector/prometheus/prometheus.yml"

MANIFESTS = load_manifests()


def validate(objects: list[dict[str, Any]]) -> list[list[str]]:
    """The errors of each object (empty when valid), from tests/kubernetes_validator/validate.mjs."""
    node = shutil.which("node")
    assert node, "Node.js is missing: run `make system-deps` (make test does)"
    assert (VALIDATOR / "node_modules/.installed").exists(), "run `make kubernetes-validator` (make test does)"
    result = subprocess.run(
        [node, str(VALIDATOR / "validate.mjs")],
        input=json.dumps(objects),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert [(entry["kind"], entry["name"]) for entry in report] == [
        (item.get("kind"), (item.get("metadata") or {}).get("name")) for item in objects
    ]
    return [entry["errors"] for entry in report]


def page_objects() -> list[dict[str, Any]]:
    """The Kubernetes objects of the YAML blocks docs/scaling.md marks `<!-- check: kubernetes -->`."""
    blocks = re.findall(r"<!-- check: kubernetes -->\n+```yaml\n(.*?)```", PAGE.read_text(), re.DOTALL)
    assert blocks, "docs/scaling.md has no Kubernetes example marked for checking"
    return [item for block in blocks for item in yaml.safe_load_all(block) if item]


def _broken() -> dict[str, dict[str, Any]]:
    """What a wrong manifest looks like, one mistake each, made from the real manifests."""
    worker = MANIFESTS["podmonitor-shop-worker.yaml"]
    web = MANIFESTS["servicemonitor-shop-web.yaml"]
    rules = MANIFESTS["prometheusrule-shop-alerts.yaml"]
    service = MANIFESTS["service-shop-web-metrics.yaml"]
    cases: dict[str, dict[str, Any]] = {}

    def case(name: str, source: dict[str, Any]) -> dict[str, Any]:
        cases[name] = copy.deepcopy(source)
        cases[name]["metadata"]["name"] = name
        return cases[name]

    case("port-as-number", worker)["spec"]["podMetricsEndpoints"][0]["port"] = 9464
    del case("no-selector", web)["spec"]["selector"]
    case("interval-in-words", worker)["spec"]["podMetricsEndpoints"][0]["interval"] = "10 seconds"
    case("misspelt-key", worker)["spec"]["podMetricsEndpoints"][0]["intervall"] = "10s"
    case("for-as-number", rules)["spec"]["groups"][0]["rules"][0]["for"] = 5
    del case("group-without-name", rules)["spec"]["groups"][0]["name"]
    case("service-port-as-text", service)["spec"]["ports"][0]["port"] = "9464"
    case("unknown-kind", worker)["kind"] = "PodMonitors"
    return cases


BROKEN = _broken()


@pytest.fixture(scope="module")
def verdicts() -> dict[str, list[str]]:
    """One validator run for everything: the manifests, the page's examples and the broken cases."""
    named = {f"manifest {name}": item for name, item in MANIFESTS.items()}
    named |= {f"page {item['kind']} {item['metadata']['name']}": item for item in page_objects()}
    named |= {f"broken {name}": item for name, item in BROKEN.items()}
    return dict(zip(named, validate(list(named.values())), strict=True))


def test_committed_manifests_are_what_the_generator_renders() -> None:
    """collector/kubernetes/*.yaml are exactly what `make kubernetes` renders from the rule files and
    collector/kubernetes.py: a hand edit, a rule changed without regenerating, or a stray file fails.
    """
    rendered = render_all()
    assert sorted(rendered) == sorted(MANIFESTS)
    for name, text in rendered.items():
        assert (kubernetes.MANIFESTS_DIR / name).read_text() == text, f"{name} is stale: run `make kubernetes`"
    assert kubernetes.main(["--check"]) == 0


def test_check_mode_reports_a_hand_edited_or_stray_manifest(tmp_path: Path) -> None:
    """`python -m collector.kubernetes --check` fails on an edited or a stray file and writes nothing;
    a plain run rewrites the one and removes the other; a changed rule file changes its PrometheusRule.
    """
    output = tmp_path / "kubernetes"
    assert kubernetes.main(["--output", str(output)]) == 0
    assert kubernetes.main(["--output", str(output), "--check"]) == 0
    edited = output / "podmonitor-shop-worker.yaml"
    edited.write_text(edited.read_text().replace("interval: 10s", "interval: 30s"))
    (output / "old.yaml").write_text("kind: Old\n")
    assert kubernetes.main(["--output", str(output), "--check"]) == 1
    assert "interval: 30s" in edited.read_text()
    assert kubernetes.main(["--output", str(output)]) == 0
    assert not (output / "old.yaml").exists()
    assert kubernetes.main(["--output", str(output), "--check"]) == 0
    rules = tmp_path / "rules"
    shutil.copytree(RULES_DIR, rules)
    recording = rules / "shop-recording.yml"
    recording.write_text(recording.read_text().replace("rate5m", "rate1m"))
    assert kubernetes.main(["--output", str(output), "--rules", str(rules), "--check"]) == 1


def test_the_generator_runs_as_a_module() -> None:
    """`python -m collector.kubernetes --check` (what `make kubernetes` runs, without writing) succeeds."""
    result = subprocess.run(
        [sys.executable, "-m", "collector.kubernetes", "--check"], cwd=REPO, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("name", sorted(MANIFESTS))
def test_every_manifest_validates_against_its_schema(name: str, verdicts: dict[str, list[str]]) -> None:
    """Each manifest is valid for its kind (prometheus-operator's CRD schema for the monitoring.coreos.com
    kinds, Kubernetes' for the Service) and has no field the schema does not know: the API server
    (kubectl's strict field validation) would accept it as written.
    """
    assert verdicts[f"manifest {name}"] == []


def test_the_pages_kubernetes_examples_validate(verdicts: dict[str, list[str]]) -> None:
    """The Deployment and KEDA ScaledObject examples of docs/scaling.md are valid objects too."""
    page = {name: errors for name, errors in verdicts.items() if name.startswith("page ")}
    assert {name.split()[1] for name in page} >= {"Deployment", "ScaledObject"}
    assert page == {name: [] for name in page}


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("port-as-number", "port must be string"),
        ("no-selector", "must have required property selector"),
        ("interval-in-words", "interval must match pattern"),
        ("misspelt-key", "'\"intervall\"' does not exist in type"),
        ("for-as-number", "for must be string"),
        ("group-without-name", "must have required property name"),
        ("service-port-as-text", "port must be integer"),
        ("unknown-kind", "no schema for apiVersion monitoring.coreos.com/v1 kind PodMonitors"),
    ],
)
def test_the_schema_check_rejects_a_wrong_manifest(case: str, expected: str, verdicts: dict[str, list[str]]) -> None:
    """The check can fail: a wrong type, a missing required field, a malformed duration, a misspelt key
    and an unknown kind are each reported, naming what is wrong.
    """
    errors = verdicts[f"broken {case}"]
    assert any(expected in error for error in errors), errors


def _rules_by_name() -> dict[str, dict[str, Any]]:
    objects = [item for item in MANIFESTS.values() if item["kind"] == "PrometheusRule"]
    return {item["metadata"]["name"]: item for item in objects}


def test_each_rule_file_is_one_prometheus_rule_with_the_same_groups() -> None:
    """Every rule file of collector/prometheus/rules/ is one PrometheusRule (spyglass-<file>) whose groups
    equal the file's: same groups, alerts, expressions, durations, labels and annotations.
    """
    by_name = _rules_by_name()
    files = sorted(RULES_DIR.glob("*.yml"))
    assert sorted(by_name) == sorted(f"spyglass-{path.stem}" for path in files)
    for path in files:
        assert by_name[f"spyglass-{path.stem}"]["spec"]["groups"] == yaml.safe_load(path.read_text())["groups"]


def test_promtool_accepts_the_rules_taken_out_of_the_prometheus_rules(tmp_path: Path) -> None:
    """The groups of each PrometheusRule, written back as a Prometheus rule file, pass `promtool check rules`."""
    paths = []
    for name, item in _rules_by_name().items():
        path = tmp_path / f"{name}.yml"
        path.write_text(yaml.safe_dump({"groups": item["spec"]["groups"]}, sort_keys=False))
        paths.append(str(path))
    result = subprocess.run(["promtool", "check", "rules", *paths], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def _monitored_jobs() -> dict[str, dict[str, Any]]:
    """The monitor scraping each job, the job derived as prometheus-operator derives it (from jobLabel)."""
    services = [item for item in MANIFESTS.values() if item["kind"] == "Service"]
    jobs: dict[str, dict[str, Any]] = {}
    for item in MANIFESTS.values():
        if item["kind"] == "PodMonitor":
            assert item["spec"]["jobLabel"] == NAME_LABEL
            jobs[item["spec"]["selector"]["matchLabels"][NAME_LABEL]] = item
        elif item["kind"] == "ServiceMonitor":
            wanted = item["spec"]["selector"]["matchLabels"]
            (service,) = [s for s in services if wanted.items() <= s["metadata"]["labels"].items()]
            assert item["spec"]["jobLabel"] == NAME_LABEL
            job = service["metadata"]["labels"][NAME_LABEL]
            assert service["spec"]["selector"] == {NAME_LABEL: job}, "the Service must select the job's pods"
            jobs[job] = item
    return jobs


def test_monitors_scrape_the_jobs_the_stack_and_the_rules_name() -> None:
    """The monitors scrape exactly the compose stack's services, each as job = its OTEL_SERVICE_NAME
    (what prometheus.yml relabels compose's services to and what the SLOs and dashboards select),
    from the pod label app.kubernetes.io/name.
    """
    compose = load_compose()["services"]
    service_names = {compose[name]["environment"]["OTEL_SERVICE_NAME"] for name in ("web", "worker", "beat")}
    assert set(_monitored_jobs()) == service_names
    slos = yaml.safe_load((REPO / "collector/prometheus/slos.yaml").read_text())["slos"]
    assert {slo["job"] for slo in slos} <= service_names


def test_monitors_use_the_metrics_port_and_the_stacks_scrape_timing() -> None:
    """Every endpoint is the container port named `metrics` on /metrics, which the Service maps to
    SPYGLASS_METRICS_PORT (9464, as compose sets it); interval and timeout are prometheus.yml's; every
    object carries the labels the Prometheus resource selects.
    """
    compose = load_compose()["services"]
    port = int(compose["web"]["environment"]["SPYGLASS_METRICS_PORT"])
    timing = yaml.safe_load(PROMETHEUS_CONFIG.read_text())["global"]
    for item in MANIFESTS.values():
        assert SELECTOR_LABELS.items() <= item["metadata"]["labels"].items(), item["metadata"]["name"]
        endpoints = item["spec"].get("podMetricsEndpoints") or item["spec"].get("endpoints") or []
        for endpoint in endpoints:
            assert endpoint["port"] == METRICS_PORT_NAME
            assert endpoint["path"] == "/metrics"
            assert (endpoint["interval"], endpoint["scrapeTimeout"]) == (
                timing["scrape_interval"],
                timing["scrape_timeout"],
            )
        if item["kind"] == "Service":
            (mapping,) = item["spec"]["ports"]
            assert (mapping["name"], mapping["port"], mapping["targetPort"]) == (METRICS_PORT_NAME, port, "metrics")


def test_the_pages_deployments_match_what_the_monitors_select() -> None:
    """The page's example Deployments label their pods with the job the monitors expect (equal to
    OTEL_SERVICE_NAME), name the container port `metrics` on SPYGLASS_METRICS_PORT and bind it on every
    interface (SPYGLASS_METRICS_HOST=0.0.0.0), so the monitors find and reach them.
    """
    jobs = _monitored_jobs()
    deployments = [item for item in page_objects() if item["kind"] == "Deployment"]
    assert deployments
    for deployment in deployments:
        template = deployment["spec"]["template"]
        job = template["metadata"]["labels"][NAME_LABEL]
        assert job in jobs, f"no monitor scrapes {job}"
        (container,) = template["spec"]["containers"]
        env = {item["name"]: item.get("value") for item in container["env"]}
        assert env["OTEL_SERVICE_NAME"] == job
        assert env["SPYGLASS_METRICS_HOST"] == "0.0.0.0"
        ports = {item["name"]: item["containerPort"] for item in container["ports"]}
        assert ports[METRICS_PORT_NAME] == int(env["SPYGLASS_METRICS_PORT"])
