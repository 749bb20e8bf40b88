"""Prometheus rules for the SLOs declared in ``collector/prometheus/slos.yaml``.

``python -m collector.slo_rules`` (``make rules``) validates the spec and writes
``collector/prometheus/rules/slo.yml``; ``--check`` only says whether that file is current. For each SLO
it writes one rule group, evaluated in order:

- ``slo:sli_error:ratio_rate<w>`` for w in 5m, 30m, 1h, 2h, 6h, 1d, 3d: the share of bad events over
  the window, ``sum(rate(bad[w])) / sum(rate(all[w]))`` by job, numerator and denominator
  aggregated separately. A window without events records nothing (rather than NaN, which would
  poison the 30-day average); a window with events and no bad one records 0.
- ``slo:sli_error:ratio_rate30d``: the average of the 5m ratio over 30 days (sum_over_time /
  count_over_time, as Sloth does), cheap to evaluate and close to the event-weighted ratio when
  traffic is steady.
- ``slo:objective:ratio``, ``slo:error_budget:ratio`` (1 - objective) and
  ``slo:error_budget_remaining:ratio`` (1 - 30d error ratio / budget; negative when overspent).
- The SLO's alert, multi-window multi-burn-rate (Google SRE workbook, chapter 5, 30-day period):
  severity critical when the error ratio exceeds 14.4x the budget over 1h and 5m, or 6x over 6h
  and 30m; severity warning at 3x over 1d and 2h, or 1x over 3d and 6h. The long window says the
  budget really burns, the short one that it still does (the alert stops soon after the fix).

Every series carries the labels ``slo`` and ``job``; every alert ``severity``, ``slo`` and ``job``
and the annotations ``summary``, ``description``, ``runbook_url`` and ``dashboard_url``
(:mod:`collector.links`).

The same command re-points the runbook and dashboard links of the hand-written rule files in
``collector/prometheus/rules/`` at :data:`collector.links.RUNBOOKS_URL` and
:data:`collector.links.GRAFANA_URL`, so that changing those two constants and running
``make rules`` moves every alert's links.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from collector.links import GRAFANA_URL, RUNBOOKS_URL, dashboard_url, runbook_url

__all__ = [
    "OUTPUT_PATH",
    "PAGE",
    "PERIOD",
    "RULES_DIR",
    "SLI",
    "SLO",
    "SPEC_PATH",
    "TICKET",
    "WINDOWS",
    "BurnCondition",
    "Spec",
    "SpecError",
    "load_spec",
    "main",
    "parse_spec",
    "relink",
    "render",
]

COLLECTOR = Path(__file__).resolve().parent
SPEC_PATH = COLLECTOR / "prometheus/slos.yaml"
RULES_DIR = COLLECTOR / "prometheus/rules"
OUTPUT_PATH = RULES_DIR / "slo.yml"

PERIOD = "30d"
"""The SLO period; the burn-rate factors below are the SRE workbook's for 30 days."""
WINDOWS = ("5m", "30m", "1h", "2h", "6h", "1d", "3d")
"""Windows of the recorded ``slo:sli_error:ratio_rate<window>`` series."""


@dataclass(frozen=True)
class BurnCondition:
    """Both windows burn faster than ``factor`` times the sustainable rate."""

    long: str
    short: str
    factor: float
    budget_gone_in: str
    """How long a 30-day budget lasts at this burn rate, in words."""


PAGE = (BurnCondition("1h", "5m", 14.4, "about 2 days"), BurnCondition("6h", "30m", 6, "5 days"))
"""Severity critical: 2 % of the budget spent in an hour, or 5 % in six hours."""
TICKET = (BurnCondition("1d", "2h", 3, "10 days"), BurnCondition("3d", "6h", 1, "30 days"))
"""Severity warning: 10 % of the budget spent in a day, or in three days."""
PAGE_FOR = "2m"
TICKET_FOR = "15m"

_NAME = r"[a-zA-Z_:][a-zA-Z0-9_:]*"
_LABEL = r"[a-zA-Z_][a-zA-Z0-9_]*"
_SELECTOR = re.compile(rf"\s*(?P<name>{_NAME})\s*(?:\{{(?P<matchers>.*)\}})?\s*", re.DOTALL)
_MATCHER = re.compile(rf'\s*(?P<label>{_LABEL})\s*(?P<op>=~|!=|!~|=)\s*"(?P<value>(?:[^"\\]|\\.)*)"\s*(?:,|$)')


class SpecError(ValueError):
    """The SLO spec cannot be turned into rules; the message says where and why."""


def parse_matchers(text: str) -> list[str]:
    """``a="1", b=~"x.*"`` as a list of matchers in PromQL syntax; raises ValueError if malformed."""
    matchers = []
    position = 0
    text = text.strip()
    while position < len(text):
        match = _MATCHER.match(text, position)
        if match is None:
            raise ValueError(
                f'cannot read label matchers {text!r} at {text[position:]!r}: write label="value" '
                "(or !=, =~, !~), double-quoted, separated by commas"
            )
        matchers.append(f'{match["label"]}{match["op"]}"{match["value"]}"')
        position = match.end()
    for matcher in matchers:
        label = re.match(_LABEL, matcher)
        if label is not None and label[0] in ("job", "le", "__name__"):
            raise ValueError(
                f"label {label[0]} is set by the generator (job from the SLO's job key, le from "
                "threshold_seconds, the name from the metric): leave it out of the selector"
            )
    return matchers


def parse_selector(text: str) -> tuple[str, list[str]]:
    """A series selector ``metric{matchers}`` as (metric name, matchers); raises ValueError if malformed."""
    match = _SELECTOR.fullmatch(text)
    if match is None:
        raise ValueError(f'{text!r} is not a series selector: write metric_name or metric_name{{label="value"}}')
    return match["name"], parse_matchers(match["matchers"] or "")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SLI(_Strict):
    """How an SLO counts its events: ``events`` and ``errors`` selectors, or a histogram and a threshold."""

    events: str | None = None
    errors: str | None = None
    histogram: str | None = None
    threshold_seconds: float | None = None
    selector: str | None = None

    @field_validator("events", "errors")
    @classmethod
    def _counter_selector(cls, value: str | None) -> str | None:
        if value is not None:
            parse_selector(value)
        return value

    @field_validator("histogram")
    @classmethod
    def _histogram_name(cls, value: str | None) -> str | None:
        if value is None:
            return value
        if not re.fullmatch(_NAME, value):
            raise ValueError(f"{value!r} is not a metric name")
        if value.endswith(("_bucket", "_count", "_sum")):
            raise ValueError(
                f"name the histogram itself ({re.sub(r'_(bucket|count|sum)$', '', value)}), not a series of it"
            )
        return value

    @field_validator("threshold_seconds")
    @classmethod
    def _positive(cls, value: float | None) -> float | None:
        if value is not None and not value > 0:
            raise ValueError(f"must be a positive number of seconds, got {value}")
        return value

    @field_validator("selector")
    @classmethod
    def _matchers(cls, value: str | None) -> str | None:
        if value is not None:
            parse_matchers(value)
        return value

    @model_validator(mode="after")
    def _one_form(self) -> SLI:
        ratio = self.events is not None or self.errors is not None
        histogram = self.histogram is not None or self.threshold_seconds is not None or self.selector is not None
        if ratio and histogram:
            raise ValueError("use either events + errors, or histogram + threshold_seconds (+ selector), not both")
        if ratio and (self.events is None or self.errors is None):
            raise ValueError("events and errors go together: give both selectors")
        if histogram and (self.histogram is None or self.threshold_seconds is None):
            raise ValueError("histogram and threshold_seconds go together: give both")
        if not ratio and not histogram:
            raise ValueError("give events + errors, or histogram + threshold_seconds")
        if self.histogram is not None and self.threshold_seconds is not None:
            _check_bucket(self.histogram, self.threshold_seconds)
        return self


def _check_bucket(histogram: str, threshold: float) -> None:
    """A catalog histogram must have a bucket boundary at the threshold (other histograms are not known here)."""
    from spyglass.catalog import CATALOG

    spec = next((spec for spec in CATALOG if spec.name == histogram), None)
    if spec is None:
        return
    if spec.type != "histogram":
        raise ValueError(f"{histogram} is a {spec.type}, not a histogram")
    if not any(abs(bound - threshold) < 1e-12 for bound in spec.buckets):
        bounds = ", ".join(_number(bound) for bound in spec.buckets)
        raise ValueError(
            f"threshold_seconds {_number(threshold)} is not a bucket boundary of {histogram} ({bounds}): "
            "good events could not be counted exactly"
        )


class SLO(_Strict):
    """One service level objective."""

    slo: str = Field(pattern=r"^[a-z0-9]+(-[a-z0-9]+)*$")
    job: str = Field(pattern=r'^[^"\\\n]+$')
    objective: float
    alert: str = Field(pattern=r"^[A-Z][A-Za-z0-9]*$")
    description: str = Field(min_length=1)
    sli: SLI

    @field_validator("objective")
    @classmethod
    def _between_0_and_1(cls, value: float) -> float:
        if not 0 < value < 1:
            raise ValueError(f"must be strictly between 0 and 1 (0.995 means 99.5 % good events), got {value}")
        return value

    @property
    def error_budget(self) -> float:
        """1 - objective, rounded off float noise (0.005, not 0.0050000000000000044)."""
        return round(1 - self.objective, 12)


class Spec(_Strict):
    """The whole file: a list of SLOs with distinct names and alert names."""

    slos: list[SLO] = Field(min_length=1)

    @model_validator(mode="after")
    def _distinct(self) -> Spec:
        for key in ("slo", "alert"):
            seen: set[str] = set()
            for slo in self.slos:
                value = getattr(slo, key)
                if value in seen:
                    raise ValueError(f"two SLOs have {key} {value!r}; each needs its own")
                seen.add(value)
        return self


_MODELS: dict[str, type[BaseModel]] = {"slos": SLO, "sli": SLI}
_PATTERN_HINTS = {
    "slo": "a name of lower-case letters, digits and dashes (api-availability)",
    "alert": "an alert name in CamelCase, letters and digits (APIAvailabilityBudgetBurn)",
    "job": "a job name without quotes, backslashes or line breaks",
}


def _where(loc: Sequence[Any], data: Any) -> str:
    """``slos[1] (api-latency).sli.threshold_seconds`` for a pydantic error location."""
    parts: list[str] = []
    node = data
    for key in loc:
        if isinstance(key, int):
            parts[-1] += f"[{key}]"
            node = node[key] if isinstance(node, list) and key < len(node) else None
            if isinstance(node, dict) and isinstance(node.get("slo"), str):
                parts[-1] += f" ({node['slo']})"
        else:
            parts.append(str(key))
            node = node.get(key) if isinstance(node, dict) else None
    return ".".join(parts) or "the file"


def _model_at(loc: Sequence[Any]) -> type[BaseModel]:
    names = [key for key in loc if isinstance(key, str)]
    return _MODELS.get(names[-1], Spec) if names else Spec


def _describe(error: ValidationError, data: Any) -> list[str]:
    problems = []
    for item in error.errors():
        loc = item["loc"]
        where = _where(loc, data)
        if item["type"] == "extra_forbidden":
            allowed = ", ".join(_model_at(loc[:-1]).model_fields)
            problems.append(f"{where}: unknown key {loc[-1]!r} (allowed: {allowed})")
        elif item["type"] == "missing":
            problems.append(f"{where}: missing (required)")
        elif item["type"] == "string_pattern_mismatch":
            hint = _PATTERN_HINTS.get(str(loc[-1]), f"of the form {item.get('ctx', {}).get('pattern', '')}")
            problems.append(f"{where}: {item['input']!r} is not {hint}")
        else:
            message = item["msg"].removeprefix("Value error, ")
            if not isinstance(item["input"], dict | list) and "got" not in message:
                message += f" (got {item['input']!r})"
            problems.append(f"{where}: {message}")
    return problems


def parse_spec(text: str, source: str = "slos.yaml") -> Spec:
    """The spec in ``text``; raises :class:`SpecError` naming every problem."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise SpecError(f"{source}: not valid YAML: {exc}") from None
    try:
        return Spec.model_validate(data)
    except ValidationError as exc:
        problems = "\n".join(f"  - {problem}" for problem in _describe(exc, data))
        raise SpecError(f"{source}: invalid SLO spec:\n{problems}") from None


def load_spec(path: Path = SPEC_PATH) -> Spec:
    """The spec in the file ``path``; raises :class:`SpecError`."""
    return parse_spec(path.read_text(), str(path))


# Rendering.


def _number(value: float) -> str:
    """A number as PromQL and people read it: 0.005, 14.4, 6."""
    return format(value, ".12g")


def _percent(value: float) -> str:
    return f"{value * 100:.3g}%"


def _go_float(value: float) -> str:
    """The ``le`` label value of a bucket boundary as Prometheus stores it (``10.0``, ``0.5``)."""
    from prometheus_client.utils import floatToGoString

    return floatToGoString(value)


def _selector(name: str, job: str, matchers: Iterable[str]) -> str:
    job_matcher = f'job="{job}"'
    return f"{name}{{{', '.join([job_matcher, *matchers])}}}"


def _sum_rate(selector: str, window: str) -> str:
    return f"sum by (job) (rate({selector}[{window}]))"


def _error_ratio(slo: SLO, window: str) -> str:
    """The error ratio over ``window``: nothing without events, 0 with events and no bad one."""
    sli = slo.sli
    if sli.events is not None and sli.errors is not None:
        events_name, events_matchers = parse_selector(sli.events)
        errors_name, errors_matchers = parse_selector(sli.errors)
        total = _sum_rate(_selector(events_name, slo.job, events_matchers), window)
        bad = _sum_rate(_selector(errors_name, slo.job, errors_matchers), window)
        return f"(\n  {bad}\n  or\n  0 * {total}\n)\n/\n({total} > 0)"
    assert sli.histogram is not None and sli.threshold_seconds is not None
    matchers = parse_matchers(sli.selector or "")
    total = _sum_rate(_selector(f"{sli.histogram}_count", slo.job, matchers), window)
    good_matchers = [*matchers, f'le="{_go_float(sli.threshold_seconds)}"']
    good = _sum_rate(_selector(f"{sli.histogram}_bucket", slo.job, good_matchers), window)
    return f"(\n  {total}\n  -\n  {good}\n)\n/\n({total} > 0)"


def _burn_expression(slo: SLO, conditions: Sequence[BurnCondition]) -> str:
    budget = _number(slo.error_budget)
    terms = []
    for condition in conditions:
        threshold = f"({_number(condition.factor)} * {budget})"
        long = f'slo:sli_error:ratio_rate{condition.long}{{slo="{slo.slo}"}} > {threshold}'
        short = f'slo:sli_error:ratio_rate{condition.short}{{slo="{slo.slo}"}} > {threshold}'
        terms.append(f"(\n  {long}\n  and on (slo, job)\n  {short}\n)")
    return "\nor on (slo, job)\n".join(terms)


def _burn_description(slo: SLO, conditions: Sequence[BurnCondition], fast: bool) -> str:
    first, second = conditions
    budget = slo.error_budget
    return (
        "{{ $value | humanizePercentage }} of events were bad over the last "
        f"{_in_words(first.long)} (or {_in_words(second.long)}) on {slo.job}; good events: "
        f"{slo.description}. The objective of {_percent(slo.objective)} over {PERIOD} leaves an error budget "
        f"of {_percent(budget)}, and the budget burns more than {_number(first.factor)}x the sustainable rate "
        f"over {first.long} and {first.short} (error ratio above {_percent(first.factor * budget)}) or "
        f"{_number(second.factor)}x over {second.long} and {second.short} (above "
        f"{_percent(second.factor * budget)}). At {_number(first.factor)}x the {PERIOD} budget is gone in "
        f"{first.budget_gone_in}, at {_number(second.factor)}x in {second.budget_gone_in}"
        + (": page." if fast else ": ticket.")
    )


def _in_words(window: str) -> str:
    return {"1h": "hour", "6h": "6 hours", "1d": "day", "3d": "3 days"}[window]


def _alert(slo: SLO, fast: bool) -> dict[str, Any]:
    conditions = PAGE if fast else TICKET
    return {
        "alert": slo.alert,
        "expr": _burn_expression(slo, conditions),
        "for": PAGE_FOR if fast else TICKET_FOR,
        "labels": {"severity": "critical" if fast else "warning", "slo": slo.slo},
        "annotations": {
            "summary": f"SLO {slo.slo} ({slo.job}): error budget burning {'fast' if fast else 'steadily'}",
            "description": _burn_description(slo, conditions, fast),
            "runbook_url": runbook_url(slo.alert),
            "dashboard_url": dashboard_url("slo", slo=slo.slo),
        },
    }


def _group(slo: SLO) -> dict[str, Any]:
    labels = {"slo": slo.slo}
    rules: list[dict[str, Any]] = [
        {"record": f"slo:sli_error:ratio_rate{window}", "expr": _error_ratio(slo, window), "labels": labels}
        for window in WINDOWS
    ]
    five_minutes = f'slo:sli_error:ratio_rate5m{{slo="{slo.slo}"}}'
    rules += [
        {
            "record": f"slo:sli_error:ratio_rate{PERIOD}",
            "expr": f"sum_over_time({five_minutes}[{PERIOD}])\n/\ncount_over_time({five_minutes}[{PERIOD}])",
            "labels": labels,
        },
        {
            "record": "slo:objective:ratio",
            "expr": f"vector({_number(slo.objective)})",
            "labels": {**labels, "job": slo.job},
        },
        {
            "record": "slo:error_budget:ratio",
            "expr": f"vector({_number(slo.error_budget)})",
            "labels": {**labels, "job": slo.job},
        },
        {
            "record": "slo:error_budget_remaining:ratio",
            "expr": f'1 - slo:sli_error:ratio_rate{PERIOD}{{slo="{slo.slo}"}} / {_number(slo.error_budget)}',
            "labels": labels,
        },
        _alert(slo, fast=True),
        _alert(slo, fast=False),
    ]
    return {"name": f"slo-{slo.slo}", "rules": rules}


HEADER = """\
# Generated by `python -m collector.slo_rules` from collector/prometheus/slos.yaml: do not edit.
# Edit slos.yaml and run `make rules`; a test fails when this file and the spec differ.
# Per SLO: error ratios over 5m..3d and 30d, objective, error budget and budget remaining
# (slo:* series labelled slo and job), and its multi-window multi-burn-rate alert.
"""


class _Dumper(yaml.SafeDumper):
    """Multi-line strings as literal blocks, indented lists, no aliases: the file reads as if hand-written."""

    def increase_indent(self, flow: bool = False, indentless: bool = False) -> None:
        super().increase_indent(flow, False)

    def ignore_aliases(self, data: Any) -> bool:
        return True


def _represent_str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    if "\n" in value:
        return dumper.represent_scalar("tag:yaml.org,2002:str", value, style="|")
    return dumper.represent_scalar("tag:yaml.org,2002:str", value)


_Dumper.add_representer(str, _represent_str)


def render(spec: Spec) -> str:
    """The text of ``rules/slo.yml`` for ``spec``."""
    body = yaml.dump(
        {"groups": [_group(slo) for slo in spec.slos]},
        Dumper=_Dumper,
        sort_keys=False,
        width=4096,
        allow_unicode=True,
    )
    return HEADER + body


# Links of the hand-written rule files.

_RUNBOOK_LINE = re.compile(r"^(?P<head>\s*runbook_url:\s*[\"']?)(?P<base>[^\"'\s#]+)(?P<anchor>#\S+)$", re.M)
_DASHBOARD_LINE = re.compile(r"^(?P<head>\s*dashboard_url:\s*[\"']?)(?P<base>[^\"'\s]*?)(?P<path>/d/\S.*)$", re.M)


def relink(text: str) -> str:
    """``text`` (a rule file) with its runbook and dashboard links pointing at the current bases."""
    text = _RUNBOOK_LINE.sub(lambda match: match["head"] + RUNBOOKS_URL + match["anchor"], text)
    return _DASHBOARD_LINE.sub(lambda match: match["head"] + GRAFANA_URL + match["path"], text)


def _hand_written(rules_dir: Path, output: Path) -> list[Path]:
    return [path for path in sorted(rules_dir.glob("*.yml")) if path.resolve() != output.resolve()]


def main(argv: Sequence[str] | None = None) -> int:
    """Write (or with ``--check``, compare) the SLO rules and the links of the other rule files."""
    parser = argparse.ArgumentParser(
        prog="python -m collector.slo_rules",
        description="Generate Prometheus SLO recording rules and burn-rate alerts from the SLO spec.",
    )
    parser.add_argument("--spec", type=Path, default=SPEC_PATH, help="the SLO spec (default: %(default)s)")
    parser.add_argument("--output", type=Path, default=OUTPUT_PATH, help="the rule file (default: %(default)s)")
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 if a rule file is out of date")
    args = parser.parse_args(argv)
    try:
        spec = load_spec(args.spec)
    except (SpecError, OSError) as exc:
        print(exc, file=sys.stderr)
        return 2
    wanted = {args.output: render(spec)}
    for path in _hand_written(args.output.parent, args.output):
        wanted[path] = relink(path.read_text())
    stale = [path for path, text in wanted.items() if not path.exists() or path.read_text() != text]
    if args.check:
        for path in stale:
            print(f"{path} is out of date: run `make rules`", file=sys.stderr)
        return 1 if stale else 0
    for path in stale:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(wanted[path])
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
