"""Configuration: standard OTEL_* variables first, SPYGLASS_* for the rest, and loud failures."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from spyglass.config import ConfigError, load_settings
from tests.conftest import clean_environment

REPO = Path(__file__).resolve().parent.parent
CONFIG_SOURCE = REPO / "instrumentation/src/spyglass/config.py"
CONFIGURATION_DOC = REPO / "docs/configuration.md"


def test_defaults_suit_a_local_run() -> None:
    """With nothing set, traces go to an OTLP JSON file, everything is sampled, metrics on 9464."""
    settings = load_settings({})
    assert settings.traces_exporters == ("otlp_json_file",)
    assert settings.traces_file == "var/otlp/traces.jsonl"
    assert settings.traces_sampler == "parentbased_always_on"
    assert settings.metrics_port == 9464
    assert settings.log_format == "json"
    assert settings.propagators == ("tracecontext", "baggage")


def test_otlp_endpoint_switches_the_default_exporter_to_otlp() -> None:
    """Naming a collector is enough: the exporter becomes OTLP/HTTP to <endpoint>/v1/traces."""
    settings = load_settings({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318/"})
    assert settings.traces_exporters == ("otlp",)
    assert settings.otlp_traces_endpoint == "http://collector:4318/v1/traces"
    signal = load_settings({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "https://x.example:4318/custom"})
    assert signal.otlp_traces_endpoint == "https://x.example:4318/custom"


def test_service_name_and_resource_attributes() -> None:
    """OTEL_SERVICE_NAME wins over service.name in OTEL_RESOURCE_ATTRIBUTES; values are URL-decoded."""
    settings = load_settings(
        {
            "OTEL_SERVICE_NAME": "checkout",
            "OTEL_RESOURCE_ATTRIBUTES": "service.name=ignored,service.version=2.0.1,team=pay%20ments",
        }
    )
    assert settings.service_name == "checkout"
    assert settings.service_version == "2.0.1"
    assert settings.resource_attributes["team"] == "pay ments"


@pytest.mark.parametrize(
    ("variable", "value", "accepted"),
    [
        ("OTEL_TRACES_EXPORTER", "jaeger", "otlp, console, none, otlp_json_file"),
        ("OTEL_TRACES_SAMPLER", "sometimes", "always_on"),
        ("OTEL_TRACES_SAMPLER_ARG", "1.5", "between 0.0 and 1.0"),
        ("OTEL_SDK_DISABLED", "maybe", "true or false"),
        ("OTEL_EXPORTER_OTLP_ENDPOINT", "collector:4318", "http://"),
        ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc", "http/protobuf"),
        ("OTEL_PROPAGATORS", "b3", "tracecontext, baggage, none"),
        ("OTEL_RESOURCE_ATTRIBUTES", "novalue", "key=value"),
        ("OTEL_BSP_MAX_QUEUE_SIZE", "0", "at least 1"),
        ("OTEL_EXPORTER_OTLP_TIMEOUT", "soon", "milliseconds"),
        ("SPYGLASS_METRICS_PORT", "70000", "between 0 and 65535"),
        ("SPYGLASS_LOG_FORMAT", "xml", "json, console"),
        ("SPYGLASS_LOG_LEVEL", "loud", "debug, info"),
        ("SPYGLASS_EXCLUDED_URLS", "(unclosed", "regular expressions"),
    ],
)
def test_an_invalid_value_names_the_variable_and_what_it_accepts(variable: str, value: str, accepted: str) -> None:
    """Every validated variable fails with its name, the bad value and the accepted values."""
    sampler = {"OTEL_TRACES_SAMPLER": "traceidratio"} if variable == "OTEL_TRACES_SAMPLER_ARG" else {}
    with pytest.raises(ConfigError) as caught:
        load_settings({variable: value, **sampler})
    message = str(caught.value)
    assert variable in message and repr(value) in message and accepted in message


def test_batch_size_may_not_exceed_queue_size() -> None:
    """An export batch larger than the queue is rejected instead of silently clamped."""
    with pytest.raises(ConfigError, match="OTEL_BSP_MAX_EXPORT_BATCH_SIZE"):
        load_settings({"OTEL_BSP_MAX_QUEUE_SIZE": "100", "OTEL_BSP_MAX_EXPORT_BATCH_SIZE": "200"})


def test_a_bad_setting_stops_the_app_at_import_with_a_clear_message(tmp_path: Path) -> None:
    """`import spyglass.auto` with a typo in the environment exits with the variable named, no traceback noise."""
    env = clean_environment()
    env.update(OTEL_TRACES_SAMPLER="parentbased_alwayson", SPYGLASS_METRICS_PORT="0")
    result = subprocess.run(
        [sys.executable, "-c", "import spyglass.auto"], env=env, cwd=tmp_path, capture_output=True, text=True
    )
    assert result.returncode != 0
    last_line = result.stderr.strip().splitlines()[-1]
    assert last_line.startswith("spyglass.config.ConfigError: OTEL_TRACES_SAMPLER='parentbased_alwayson'")
    assert "parentbased_always_on" in last_line


def test_every_variable_read_is_documented() -> None:
    """docs/configuration.md has a row for every variable config.py reads."""
    variables = set(re.findall(r'"((?:OTEL|SPYGLASS|PROMETHEUS)_[A-Z_]+)"', CONFIG_SOURCE.read_text()))
    documented = CONFIGURATION_DOC.read_text()
    missing = sorted(name for name in variables if f"`{name}`" not in documented)
    assert variables and not missing, missing
