"""collector/alert_profile.py shortens alerting waits in copies of the rules and configurations.

Durations parse and print as Prometheus writes them; the FAST profile divides every `for:` by ten
(never below 15 s) and leaves every expression, label and annotation alone; the copies it writes
pass promtool and amtool; and the repository's own files are never touched.
"""

from __future__ import annotations

import copy
import hashlib
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from collector.alert_profile import (
    FAST,
    PROFILES,
    REAL,
    AlertProfile,
    DurationError,
    format_duration,
    parse_duration,
    profile_named,
    write_rules,
)
from tests.conftest import REPO

RULES_DIR = REPO / "collector/prometheus/rules"
RULE_FILES = sorted(RULES_DIR.glob("*.yml"))
PROMETHEUS_YML = REPO / "collector/prometheus/prometheus.yml"
ALERTMANAGER_YML = REPO / "collector/alertmanager/alertmanager.yml"


def load(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def digests(paths: list[Path]) -> dict[Path, str]:
    return {path: hashlib.sha256(path.read_bytes()).hexdigest() for path in paths}


# Durations.

KNOWN = [
    ("0", 0),
    ("0s", 0),
    ("250ms", 0.25),
    ("10s", 10),
    ("5m", 300),
    ("1h30m", 5400),
    ("1d", 86400),
    ("1w", 604800),
    ("1y", 365 * 86400),
    ("1h0m5s", 3605),
    ("2m500ms", 120.5),
]


@pytest.mark.parametrize(("text", "seconds"), KNOWN, ids=[text for text, _ in KNOWN])
def test_parse_duration_reads_prometheus_durations(text: str, seconds: float) -> None:
    """Units y (365 d), w, d, h, m, s and ms, largest first, combine; "0" alone is zero."""
    assert parse_duration(text) == seconds


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0, "0s"),
        (30, "30s"),
        (90, "1m30s"),
        (3600, "1h"),
        (0.25, "250ms"),
        (86400, "1d"),
        (1440, "24m"),
        (604800 + 3601.5, "1w1h1s500ms"),
        (12.0004, "12s"),
        (0.0006, "1ms"),
    ],
)
def test_format_duration_writes_the_shortest_exact_duration(seconds: float, text: str) -> None:
    """Largest units first, zero units left out, rounded to whole milliseconds; zero is "0s"."""
    assert format_duration(seconds) == text


@pytest.mark.parametrize("seconds", [0, 0.001, 1, 59.999, 61, 3599, 3601, 86399.5, 90061.001, 31536000 + 7])
def test_format_then_parse_round_trips(seconds: float) -> None:
    """parse_duration(format_duration(s)) == s for any whole number of milliseconds, and back to the same text."""
    text = format_duration(seconds)
    assert parse_duration(text) == pytest.approx(seconds, abs=1e-9)
    assert format_duration(parse_duration(text)) == text


@pytest.mark.parametrize("text", ["5", "m", "5x", "", "-5m", "5m3", "5 m", "1.5m", "5s1m", "1h1h", " 5m"])
def test_bad_durations_raise_duration_error_naming_the_text(text: str) -> None:
    """A bare number, a unit alone, an unknown unit, emptiness, a sign, a trailing number, wrong order: refused."""
    with pytest.raises(DurationError) as caught:
        parse_duration(text)
    assert repr(text) in str(caught.value)
    assert isinstance(caught.value, ValueError)


@pytest.mark.parametrize("seconds", [-1, float("inf"), float("nan")])
def test_format_duration_refuses_negative_and_non_finite_seconds(seconds: float) -> None:
    """No Prometheus duration is negative or infinite."""
    with pytest.raises(DurationError):
        format_duration(seconds)


# Profiles.


def test_profiles_are_known_by_name() -> None:
    """PROFILES holds real and fast; profile_named finds them."""
    assert PROFILES == {"real": REAL, "fast": FAST}
    assert profile_named("fast") is FAST and profile_named("real") is REAL


def test_an_unknown_profile_name_lists_the_known_ones() -> None:
    """profile_named("nope") raises ValueError naming "nope", "fast" and "real"."""
    with pytest.raises(ValueError, match="nope") as caught:
        profile_named("nope")
    assert "fast" in str(caught.value) and "real" in str(caught.value)


@pytest.mark.parametrize(
    ("original", "fast"),
    [("5m", "30s"), ("2m", "15s"), ("3m", "18s"), ("15m", "1m30s"), ("1h", "6m"), ("0s", "0s"), ("10s", "10s")],
)
def test_fast_for_is_a_tenth_but_at_least_15_seconds(original: str, fast: str) -> None:
    """A tenth of the original, at least 15 s; zero stays zero and a `for:` already under 15 s is not lengthened."""
    assert FAST.for_duration(original) == fast


def test_real_for_duration_returns_the_text_as_written() -> None:
    """The identity profile does not even rewrite "90s" as "1m30s"."""
    assert REAL.for_duration("90s") == "90s"
    assert REAL.for_duration("5m") == "5m"


def test_for_duration_refuses_a_bad_duration() -> None:
    """A rule file with `for: 5 minutes` is an error, not silently kept."""
    with pytest.raises(DurationError, match="5 minutes"):
        FAST.for_duration("5 minutes")


def test_a_profile_with_nonsense_settings_is_refused() -> None:
    """A zero or negative scale, or a negative floor, cannot be a profile."""
    for settings in ({"for_scale": 0}, {"alertmanager_scale": -1}, {"min_for_s": -1}, {"evaluation_interval_s": 0}):
        with pytest.raises(ValueError):
            AlertProfile("broken", **settings)


# Rule files.


def expected_fast(document: dict) -> dict:
    """The document with each `for:` replaced by max(0.1 * original, 15 s), computed independently."""
    expected = copy.deepcopy(document)
    for group in expected["groups"]:
        for rule in group["rules"]:
            if "for" in rule:
                rule["for"] = format_duration(max(0.1 * parse_duration(rule["for"]), 15))
    return expected


@pytest.mark.parametrize("path", RULE_FILES, ids=[path.name for path in RULE_FILES])
def test_fast_changes_only_the_for_of_the_real_rule_files(path: Path) -> None:
    """Every `for:` becomes max(0.1 x original, 15 s); expr, labels, annotations, names, order: unchanged."""
    document = load(path)
    original = copy.deepcopy(document)
    profiled = FAST.rule_file(document)
    assert profiled == expected_fast(document)
    assert document == original, "the parsed source is not mutated"
    for group, source_group in zip(profiled["groups"], document["groups"], strict=True):
        for rule, source_rule in zip(group["rules"], source_group["rules"], strict=True):
            assert list(rule) == list(source_rule), "no key added or reordered"


def test_the_real_rule_files_have_alerts_with_for_and_recording_rules_without() -> None:
    """The rule files exercise both cases: the profile has `for:` values to shorten and rules with none."""
    rules = [rule for path in RULE_FILES for group in load(path)["groups"] for rule in group["rules"]]
    assert any("for" in rule for rule in rules)
    assert any("for" not in rule for rule in rules)
    for rule in rules:
        if "for" not in rule:
            assert "for" not in FAST.rule_file({"groups": [{"name": "g", "rules": [rule]}]})["groups"][0]["rules"][0]


@pytest.mark.parametrize("path", RULE_FILES, ids=[path.name for path in RULE_FILES])
def test_real_is_the_identity_on_rule_files(path: Path) -> None:
    """REAL returns an equal copy (not the same object)."""
    document = load(path)
    profiled = REAL.rule_file(document)
    assert profiled == document and profiled is not document


def test_keep_firing_for_and_long_group_intervals_are_shortened() -> None:
    """keep_firing_for scales like `for:`; a group `interval:` longer than 5 s becomes 5 s, a shorter one stays."""
    document = {
        "groups": [
            {
                "name": "slow",
                "interval": "1m",
                "rules": [{"alert": "A", "expr": "rate(x[5m]) > 0", "for": "10m", "keep_firing_for": "5m"}],
            },
            {"name": "quick", "interval": "2s", "rules": [{"record": "r", "expr": "sum(rate(x[1h]))"}]},
        ]
    }
    profiled = FAST.rule_file(document)
    assert profiled["groups"][0]["interval"] == "5s"
    assert profiled["groups"][0]["rules"][0] == {
        "alert": "A",
        "expr": "rate(x[5m]) > 0",
        "for": "1m",
        "keep_firing_for": "30s",
    }
    assert profiled["groups"][1] == document["groups"][1]


def test_write_rules_writes_valid_profiled_copies_and_leaves_the_repository_alone(tmp_path: Path) -> None:
    """One file per source, starting with the generated-by comment, accepted by `promtool check rules`.

    Each parses back to FAST.rule_file(source); the repository's rule files stay byte-identical.
    """
    before = digests(RULE_FILES)
    written = write_rules(FAST, RULES_DIR, tmp_path / "rules")
    assert digests(RULE_FILES) == before
    assert [path.name for path in written] == [path.name for path in RULE_FILES]
    for source, path in zip(RULE_FILES, written, strict=True):
        assert path.parent == tmp_path / "rules"
        first = path.read_text().splitlines()[0]
        assert first.startswith("# Generated from ") and f"collector/prometheus/rules/{source.name}" in first
        assert "fast" in first and "do not edit" in first.lower()
        assert load(path) == FAST.rule_file(load(source))
        result = subprocess.run(["promtool", "check", "rules", str(path)], capture_output=True, text=True)
        assert result.returncode == 0, result.stdout + result.stderr


def test_written_expressions_stay_readable_literal_blocks(tmp_path: Path) -> None:
    """Multi-line expressions are `expr: |-` blocks, not escaped strings; lists are indented as in the sources."""
    (path,) = [path for path in write_rules(FAST, RULES_DIR, tmp_path) if path.name == "shop-alerts.yml"]
    text = path.read_text()
    assert "expr: |-\n" in text
    assert "\\n" not in text
    assert "\n  - name: spyglass-http-alerts\n    rules:\n      - alert: HTTPHighErrorRatio\n" in text


def test_write_rules_removes_stale_files_and_keeps_others(tmp_path: Path) -> None:
    """A *.yml without a source is removed (its rules would still fire); other files are left alone."""
    (tmp_path / "removed-upstream.yml").write_text("groups: []\n")
    (tmp_path / "notes.txt").write_text("kept\n")
    written = write_rules(FAST, RULES_DIR, tmp_path)
    assert not (tmp_path / "removed-upstream.yml").exists()
    assert (tmp_path / "notes.txt").exists()
    assert sorted(tmp_path.glob("*.yml")) == sorted(written)


def test_write_rules_refuses_to_overwrite_its_source(tmp_path: Path) -> None:
    """Writing into the source directory would profile the repository's files: refused, nothing written."""
    (tmp_path / "a.yml").write_text("groups: []\n")
    with pytest.raises(ValueError, match="refusing"):
        write_rules(FAST, tmp_path, tmp_path / ".")
    assert (tmp_path / "a.yml").read_text() == "groups: []\n"


# Prometheus and Alertmanager configurations.


def test_fast_prometheus_sets_only_the_evaluation_interval() -> None:
    """evaluation_interval becomes "5s"; scrape_interval stays "10s"; all else equal; the source is not mutated."""
    config = load(PROMETHEUS_YML)
    original = copy.deepcopy(config)
    profiled = FAST.prometheus(config)
    assert config == original
    assert profiled["global"]["evaluation_interval"] == "5s"
    assert profiled["global"]["scrape_interval"] == "10s"
    expected = copy.deepcopy(original)
    expected["global"]["evaluation_interval"] = "5s"
    assert profiled == expected
    assert REAL.prometheus(config) == original


def test_fast_prometheus_with_its_rules_passes_promtool(tmp_path: Path) -> None:
    """The profiled prometheus.yml next to the profiled rules/ is a configuration `promtool check config` accepts."""
    write_rules(FAST, RULES_DIR, tmp_path / "rules")
    path = tmp_path / "prometheus.yml"
    path.write_text(yaml.safe_dump(FAST.prometheus(load(PROMETHEUS_YML)), sort_keys=False))
    result = subprocess.run(["promtool", "check", "config", str(path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 3 rule files found" in result.stdout + result.stderr


def test_fast_alertmanager_divides_every_routes_timings_by_ten(tmp_path: Path) -> None:
    """Root 30s/5m/4h become 3s/30s/24m, the page route's 10s/1h become 1s/6m.

    Receivers and inhibit_rules are unchanged, the source is not mutated, and `amtool check-config`
    accepts the result.
    """
    config = load(ALERTMANAGER_YML)
    original = copy.deepcopy(config)
    profiled = FAST.alertmanager(config)
    assert config == original
    route = profiled["route"]
    assert (route["group_wait"], route["group_interval"], route["repeat_interval"]) == ("3s", "30s", "24m")
    (page,) = [child for child in route["routes"] if child["receiver"] == "page"]
    assert (page["group_wait"], page["repeat_interval"]) == ("1s", "6m")
    assert "group_interval" not in page
    (ticket,) = [child for child in route["routes"] if child["receiver"] == "ticket"]
    assert ticket == next(child for child in original["route"]["routes"] if child["receiver"] == "ticket")
    assert profiled["receivers"] == original["receivers"]
    assert profiled["inhibit_rules"] == original["inhibit_rules"]
    assert {key: value for key, value in profiled.items() if key != "route"} == {
        key: value for key, value in original.items() if key != "route"
    }
    path = tmp_path / "alertmanager.yml"
    path.write_text(yaml.safe_dump(profiled, sort_keys=False))
    result = subprocess.run(["amtool", "check-config", str(path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_alertmanager_timings_are_scaled_in_deeply_nested_routes_and_floored() -> None:
    """Every level of `routes` is scaled; nothing goes under min_alertmanager_s, nothing already under it grows."""
    config = {
        "route": {
            "receiver": "r",
            "group_wait": "30s",
            "group_interval": "5m",
            "repeat_interval": "4h",
            "routes": [{"receiver": "r", "routes": [{"receiver": "r", "group_wait": "5s", "group_interval": "0s"}]}],
        }
    }
    deepest = FAST.alertmanager(config)["route"]["routes"][0]["routes"][0]
    assert deepest == {"receiver": "r", "group_wait": "1s", "group_interval": "0s"}


def test_alertmanager_defaults_left_implicit_at_the_root_are_shortened_too() -> None:
    """A root route without timings inherits Alertmanager's 30s/5m/4h; FAST writes them out shortened, REAL does not."""
    config = {"route": {"receiver": "r"}}
    assert FAST.alertmanager(config)["route"] == {
        "receiver": "r",
        "group_wait": "3s",
        "group_interval": "30s",
        "repeat_interval": "24m",
    }
    assert REAL.alertmanager(config) == config


def test_real_is_the_identity_on_both_configurations() -> None:
    """REAL changes neither prometheus.yml nor alertmanager.yml."""
    for path, apply in ((PROMETHEUS_YML, REAL.prometheus), (ALERTMANAGER_YML, REAL.alertmanager)):
        assert apply(load(path)) == load(path)
