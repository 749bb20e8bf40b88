"""docs/scaling.md holds: the series formula against real scrapes, and every config it quotes.

The formula (``collector/series.py``) is checked against a real gunicorn web driven through R
routes x M methods x S statuses and a real prefork Celery worker running T tasks on Redis
(database 8), family by family. The Collector agent and gateway configs are checked the way
tests/test_stack_files.py checks the compose one; the Prometheus snippets of the page with promtool;
every YAML block the page marks as an excerpt of a file must be part of that file.
"""

from __future__ import annotations

import re
import subprocess
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import celery
import pytest
import redis
import requests
import yaml
from prometheus_client.parser import text_string_to_metric_families

import spyglass
from collector import series
from collector.series import Observed, render_formula, series_by_family, total_series, update_page
from spyglass import runtime
from spyglass.catalog import CATALOG
from spyglass.config import load_settings
from tests.apps.routes import METHODS
from tests.celery_support import Worker, completed, start_worker, stop_worker
from tests.conftest import REPO, Gunicorn, start_gunicorn, wait_for
from tests.test_stack_files import OTELCOL_CONTRIB_0_136_0, collector_config_problems

PAGE = REPO / "docs/scaling.md"
AGENT = REPO / "collector/otel-collector/agent.yaml"
GATEWAY = REPO / "collector/otel-collector/gateway.yaml"
PROMETHEUS_CONFIG = REPO / "collector/prometheus/prometheus.yml"
SERIES_REDIS_DB = 8  # the other tests use 9-15

_HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")


def series_per_family(text: str) -> Counter[str]:
    """Series of one scrape (Prometheus text format) per catalog family; a sample of no family counts
    under its own name, so that an unexpected one shows in the comparison.
    """
    histograms = {spec.name for spec in CATALOG if spec.type == "histogram"}
    names = {spec.name for spec in CATALOG}
    counts: Counter[str] = Counter()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            name = sample.name
            if name not in names:
                for suffix in _HISTOGRAM_SUFFIXES:
                    if name.endswith(suffix) and name.removesuffix(suffix) in histograms:
                        name = name.removesuffix(suffix)
            counts[name] += 1
    return counts


# ---------------------------------------------------------------------------------------------
# The formula against real scrapes


def test_formula_has_a_term_for_every_catalog_family() -> None:
    """Every metric of the catalog has its term, with the catalog's bucket count: a metric added to the
    catalog without one makes the formula raise rather than undercount.
    """
    everything = Observed(
        http_method_route_status=1,
        http_methods=1,
        published_task_queues=1,
        publish_error_task_queue_types=1,
        celery_worker=True,
        run_task_queues=1,
        waited_task_queues=1,
        task_queue_outcomes=1,
        task_queue_exceptions=1,
        run_queues=1,
        consumed_queues=1,
        waiting_queues=1,
        beat_tasks=1,
        db_operations=1,
        db_request_routes=1,
        db_task_names=1,
        n_plus_one_routes=1,
        n_plus_one_tasks=1,
        log_export=True,
        error_types={"otel_sdk_processor_log_processed_total": 1, "spyglass_metrics_store_errors_total": 1},
    )
    by_family = series_by_family(everything)
    assert set(by_family) == {spec.name for spec in CATALOG}
    for spec in CATALOG:
        assert by_family[spec.name] == (len(spec.buckets) + 3 if spec.type == "histogram" else 1), spec.name
    assert by_family["http_server_request_duration_seconds"] == 17
    assert by_family["celery_task_runtime_seconds"] == 20
    assert total_series(everything, targets=3) == 3 * (sum(by_family.values()) + 5)
    with pytest.raises(KeyError, match="not in the catalog"):
        series_by_family(Observed(error_types={"no_such_family_total": 1}))


@pytest.fixture
def web(tmp_path: Path) -> Iterator[Gunicorn]:
    """A gunicorn web (2 workers) of tests/apps/routes.py exporting spans and log records to files."""
    server = start_gunicorn(
        tmp_path,
        app="tests.apps.routes:app",
        SERIES_ROUTES="4",
        OTEL_LOGS_EXPORTER="otlp_json_file",
        SPYGLASS_LOGS_FILE=str(tmp_path / "logs.jsonl"),
        OTEL_BLRP_SCHEDULE_DELAY="100",
    )
    yield server
    server.stop()


def test_web_series_match_the_formula_routes_times_methods_times_statuses(web: Gunicorn) -> None:
    """A gunicorn web that answered R routes x M methods x S statuses exposes, on its one endpoint, the
    series the formula gives for R*M*S combinations and M methods: 17 per combination for the latency
    histogram, one per method for the active-requests gauge, and the fixed families.
    """
    routes, statuses = 4, (200, 404, 503)
    with requests.Session() as session:
        for route in range(routes):
            for method in METHODS:
                for status in statuses:
                    for item in (1, 2):  # two different paths of one route template: one combination
                        response = session.request(method, f"{web.url}/r{route}/{item}?status={status}", timeout=5)
                        assert response.status_code == status
    exporting = "otel_sdk_exporter_log_exported_total"
    assert wait_for(lambda: exporting in web.scrape(openmetrics=False), timeout=15), "no log batch was exported"
    counted = series_per_family(web.scrape(openmetrics=False))
    expected = series_by_family(
        Observed(http_method_route_status=routes * len(METHODS) * len(statuses), http_methods=3, log_export=True)
    )
    assert dict(counted) == expected
    assert sum(counted.values()) == 11 + 2 + 1 + 17 * 36 + 3


@pytest.fixture
def worker_and_publisher(tmp_path: Path, redis_url: str) -> Iterator[tuple[Worker, celery.Celery]]:
    """A prefork worker (concurrency 2) on Redis database 8, and an instrumented publisher in this process."""
    url = f"{redis_url.rsplit('/', 1)[0]}/{SERIES_REDIS_DB}"
    started = start_worker(tmp_path, url)
    runtime.init(load_settings({"OTEL_SERVICE_NAME": "web", "SPYGLASS_METRICS_PORT": "0"}))
    publisher = celery.Celery("web", broker=url, set_as_current=False)
    spyglass.instrument_celery(publisher)
    yield started, publisher
    publisher.close()
    runtime.shutdown()
    stop_worker(started)
    redis.Redis.from_url(url).delete(started.queue)


def test_worker_series_match_the_formula_for_its_tasks_outcomes_and_queues(worker_and_publisher) -> None:
    """A Celery worker that ran T tasks from one queue (one failing with KeyError, one retrying once)
    exposes the formula's series: 20 per (task, queue) for each of the runtime and queue-wait
    histograms, one per (task, queue, outcome), per exception, per queue, and the retry's publish.
    """
    worker, publisher = worker_and_publisher
    publisher.send_task("tasks.ok", (1,), queue=worker.queue)
    publisher.send_task("tasks.chatty", (2,), queue=worker.queue)
    publisher.send_task("tasks.boom", queue=worker.queue)
    publisher.send_task("tasks.flaky", (f"flaky-{uuid.uuid4().hex}",), queue=worker.queue)

    def all_done() -> bool:
        return all(
            completed(worker, task, outcome) == 1
            for task, outcome in [
                ("tasks.ok", "success"),
                ("tasks.chatty", "success"),
                ("tasks.boom", "failure"),
                ("tasks.flaky", "success"),
            ]
        )

    assert wait_for(all_done, timeout=60), worker.log_path.read_text()[-3000:]
    text = requests.get(f"http://127.0.0.1:{worker.metrics_port}/metrics", timeout=10).text
    tasks = 4
    expected = series_by_family(
        Observed(
            celery_worker=True,
            run_task_queues=tasks,
            waited_task_queues=tasks,
            task_queue_outcomes=tasks + 1,  # flaky ended twice: retry, then success
            task_queue_exceptions=1,  # boom's KeyError (a retry is not a failure)
            run_queues=1,
            consumed_queues=1,
            waiting_queues=0,  # drained
            published_task_queues=1,  # flaky's retry is published by the pool process
        )
    )
    assert dict(series_per_family(text)) == expected
    assert sum(expected.values()) == 14 + 20 * 4 + 20 * 4 + 5 + 1 + 1 + 1 + 1


# ---------------------------------------------------------------------------------------------
# The page


def test_the_page_quotes_the_formula_the_code_computes() -> None:
    """docs/scaling.md holds the formula block exactly as `python -m collector.series` renders it from
    the catalog (bucket counts included), so the page cannot state a stale formula.
    """
    text = PAGE.read_text()
    assert render_formula() in text, "docs/scaling.md's formula is stale: run `make kubernetes`"
    assert update_page(text) == text
    assert series.main(["--check"]) == 0


def test_the_formula_command_rewrites_a_stale_block(tmp_path: Path) -> None:
    """`python -m collector.series` replaces a stale block and leaves the rest of the page alone;
    `--check` fails on the stale page; a page without markers is an error, not a silent no-op.
    """
    page = tmp_path / "scaling.md"
    page.write_text(f"# Title\n\nbefore\n\n{series.BEGIN}\nold formula\n{series.END}\n\nafter\n")
    assert series.main(["--page", str(page), "--check"]) == 1
    assert series.main(["--page", str(page)]) == 0
    assert page.read_text() == f"# Title\n\nbefore\n\n{render_formula()}\n\nafter\n"
    assert series.main(["--page", str(page), "--check"]) == 0
    page.write_text("no markers\n")
    assert series.main(["--page", str(page)]) == 2


_EXCERPT = re.compile(r"<!-- excerpt: (?P<path>\S+) -->\n+```yaml\n(?P<body>.*?)```", re.DOTALL)
_CHECKED = re.compile(r"<!-- check: (?P<kind>[a-z-]+) -->\n+```yaml\n(?P<body>.*?)```", re.DOTALL)


def is_part_of(part: Any, whole: Any) -> bool:
    """Every key of ``part`` is in ``whole`` with an equal value, recursively (lists: item by item,
    ``part``'s items each part of some item of ``whole``, in order).
    """
    if isinstance(part, dict):
        return isinstance(whole, dict) and all(key in whole and is_part_of(part[key], whole[key]) for key in part)
    if isinstance(part, list):
        if not isinstance(whole, list):
            return False
        position = 0
        for item in part:
            while position < len(whole) and not is_part_of(item, whole[position]):
                position += 1
            if position == len(whole):
                return False
            position += 1
        return True
    return part == whole


def test_is_part_of_compares_trees() -> None:
    """The excerpt check is not vacuous: a changed value, an extra key or a reordered list is refused."""
    whole = {"a": {"b": 1, "c": [{"x": 1}, {"y": 2}]}, "d": "e"}
    assert is_part_of({"a": {"c": [{"y": 2}]}}, whole)
    assert not is_part_of({"a": {"b": 2}}, whole)
    assert not is_part_of({"a": {"z": 1}}, whole)
    assert not is_part_of({"a": {"c": [{"y": 2}, {"x": 1}]}}, whole)


def test_every_excerpt_on_the_page_is_part_of_its_file() -> None:
    """A YAML block the page introduces as an excerpt of a repository file (the Collector configs, the
    Kubernetes manifests) is part of that file as it is now, so the page cannot show a stale config.
    """
    excerpts = list(_EXCERPT.finditer(PAGE.read_text()))
    assert {match["path"] for match in excerpts} >= {
        "collector/otel-collector/agent.yaml",
        "collector/otel-collector/gateway.yaml",
        "collector/kubernetes/podmonitor-shop-worker.yaml",
    }
    for match in excerpts:
        whole = yaml.safe_load((REPO / match["path"]).read_text())
        assert is_part_of(yaml.safe_load(match["body"]), whole), f"the excerpt of {match['path']} differs from it"


def _checked_blocks(kind: str) -> list[Any]:
    blocks = [yaml.safe_load(match["body"]) for match in _CHECKED.finditer(PAGE.read_text()) if match["kind"] == kind]
    assert blocks, f"docs/scaling.md has no block marked <!-- check: {kind} -->"
    return blocks


def _promtool_check_config(block: dict[str, Any], directory: Path) -> None:
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    config.update(block)
    config["rule_files"] = [str(REPO / "collector/prometheus/rules/*.yml")]
    path = directory / "prometheus.yml"
    path.write_text(yaml.safe_dump(config))
    result = subprocess.run(["promtool", "check", "config", str(path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def _dropped_families(remote_write: dict[str, Any]) -> set[str]:
    """Catalog families (and histogram sample names) a remote_write's `drop` relabellings remove."""
    candidates = {spec.name for spec in CATALOG}
    candidates |= {spec.name + suffix for spec in CATALOG if spec.type == "histogram" for suffix in _HISTOGRAM_SUFFIXES}
    dropped = set()
    for relabel in remote_write["write_relabel_configs"]:
        if relabel.get("action") == "drop" and relabel["source_labels"] == ["__name__"]:
            dropped |= {name for name in candidates if re.fullmatch(relabel["regex"], name)}
    return dropped


def _read_by_dashboards_and_rules() -> set[str]:
    """Every metric name a dashboard query or variable, or a rule of collector/prometheus/rules/, reads."""
    import json

    from dashboards.inspect import panels, variables
    from tests.promql import metric_names
    from tests.test_dashboards import variable_metric_names

    read: set[str] = set()
    for path in sorted((REPO / "dashboards/json").glob("*.json")):
        dashboard = json.loads(path.read_text())
        read |= {name for view in panels(dashboard) for query in view.queries for name in metric_names(query.expr)}
        read |= {name for variable in variables(dashboard) for name in variable_metric_names(variable.query)}
    for path in sorted((REPO / "collector/prometheus/rules").glob("*.yml")):
        for group in yaml.safe_load(path.read_text())["groups"]:
            read |= {name for rule in group["rules"] for name in metric_names(rule["expr"])}
    return read


def test_the_remote_write_config_passes_promtool_and_drops_only_what_nothing_reads(tmp_path: Path) -> None:
    """The page's `remote_write` block, added to the stack's Prometheus config, passes
    `promtool check config`, has a queue configuration, and drops only families that no dashboard,
    alert or recording rule reads: Grafana and a ruler on Mimir see everything they query.
    """
    (block,) = _checked_blocks("prometheus-config")
    _promtool_check_config(block, tmp_path)
    (remote_write,) = block["remote_write"]
    assert remote_write["queue_config"]["max_shards"] >= 1
    dropped = _dropped_families(remote_write)
    assert dropped == {"python_info", "process_max_fds", "process_open_fds", "process_virtual_memory_bytes"}
    assert not dropped & _read_by_dashboards_and_rules()


def test_the_aggregated_remote_write_drops_only_what_a_record_replaces(tmp_path: Path) -> None:
    """The page's second `remote_write` block passes promtool; each raw histogram it drops beyond the
    first block's families has a record of the page's rules aggregating it, and the `_count` series
    the SLOs and ratios read are still sent.
    """
    (block,) = _checked_blocks("prometheus-config-aggregated")
    _promtool_check_config(block, tmp_path)
    (remote_write,) = block["remote_write"]
    (first,) = _checked_blocks("prometheus-config")[0]["remote_write"]
    replaced = _dropped_families(remote_write) - _dropped_families(first)
    assert replaced, "the aggregated block drops nothing more"
    (rules,) = _checked_blocks("prometheus-rules")
    recorded = {rule["record"].split(":")[1] for group in rules["groups"] for rule in group["rules"]}
    assert replaced <= recorded, replaced - recorded
    assert not {name for name in replaced if name.endswith(("_count", "_sum"))}


def test_the_recording_rules_of_the_page_pass_promtool_and_read_catalog_metrics(tmp_path: Path) -> None:
    """The page's example recording rules (aggregating `instance` away before remote write) pass
    `promtool check rules` and read only metrics of the catalog.
    """
    from spyglass.catalog import exposed_sample_names
    from tests.promql import metric_names

    blocks = _checked_blocks("prometheus-rules")
    for block in blocks:
        path = tmp_path / "rules.yml"
        path.write_text(yaml.safe_dump(block))
        result = subprocess.run(["promtool", "check", "rules", str(path)], capture_output=True, text=True)
        assert result.returncode == 0, result.stdout + result.stderr
        for group in block["groups"]:
            for rule in group["rules"]:
                assert metric_names(rule["expr"]) <= exposed_sample_names(), rule["record"]


# ---------------------------------------------------------------------------------------------
# The Collector as agent and gateway


def load_yaml(path: Path) -> dict[str, Any]:
    return yaml.safe_load(path.read_text())


@pytest.mark.parametrize("path", [AGENT, GATEWAY], ids=lambda path: path.name)
def test_agent_and_gateway_configs_use_only_components_of_the_pinned_release(path: Path) -> None:
    """The agent and gateway configs pass the compose config's checks: every component defined, used and
    provided by otelcol-contrib 0.136.0 (the image compose pins), memory_limiter first and batch last.
    """
    assert collector_config_problems(load_yaml(path), OTELCOL_CONTRIB_0_136_0) == []


def test_agents_route_whole_traces_to_one_gateway() -> None:
    """The agent's traces go through the loadbalancing exporter keyed by trace id to the gateways'
    OTLP port, so every span of a trace (web request and Celery tasks alike) reaches the same gateway,
    whose tail sampler sees the whole trace; logs skip the gateways.
    """
    agent, gateway = load_yaml(AGENT), load_yaml(GATEWAY)
    balancing = agent["exporters"]["loadbalancing"]
    assert balancing["routing_key"] == "traceID"
    resolver = balancing["resolver"]["dns"]
    grpc = gateway["receivers"]["otlp"]["protocols"]["grpc"]["endpoint"]
    assert str(resolver["port"]) == grpc.rsplit(":", 1)[1]
    assert agent["service"]["pipelines"]["traces"]["exporters"] == ["loadbalancing"]
    assert "loadbalancing" not in agent["service"]["pipelines"]["logs"]["exporters"]
    assert agent["receivers"]["otlp"]["protocols"]["http"]["endpoint"].endswith(":4318")


def test_the_gateway_keeps_errors_slow_traces_and_a_share_of_the_rest() -> None:
    """Tail sampling on the gateway: errors, traces slower than the latency SLO's threshold, and a
    probabilistic share of the rest; decisions are cached so late spans (a task that runs after the
    decision) follow their trace's decision; sampled traces go to Tempo.
    """
    gateway = load_yaml(GATEWAY)
    sampling = gateway["processors"]["tail_sampling"]
    policies = {policy["type"]: policy for policy in sampling["policies"]}
    assert set(policies) == {"status_code", "latency", "probabilistic"}
    assert policies["status_code"]["status_code"]["status_codes"] == ["ERROR"]
    slos = yaml.safe_load((REPO / "collector/prometheus/slos.yaml").read_text())["slos"]
    latency = next(slo for slo in slos if slo["slo"] == "api-latency")
    assert policies["latency"]["latency"]["threshold_ms"] == int(latency["sli"]["threshold_seconds"] * 1000)
    assert 0 < policies["probabilistic"]["probabilistic"]["sampling_percentage"] < 100
    assert sampling["decision_cache"]["sampled_cache_size"] > 0
    pipeline = gateway["service"]["pipelines"]["traces"]
    assert pipeline["processors"] == ["memory_limiter", "tail_sampling", "batch"]
    assert pipeline["exporters"] == ["otlp/tempo"]
