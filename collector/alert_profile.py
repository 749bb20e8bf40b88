"""Alerting timings sped up for end-to-end tests and demos, applied only to copies of the configuration.

The repository's rules wait minutes before an alert fires (``for: 5m``) and Alertmanager waits
minutes more before it notifies again; a test that breaks a service and waits for the page would
take a quarter of an hour. An :class:`AlertProfile` says how to shorten the waiting, and applies it
to copies: :meth:`AlertProfile.rule_file` to a parsed rule file, :func:`write_rules` to a directory
of them, :meth:`AlertProfile.prometheus` and :meth:`AlertProfile.alertmanager` to the parsed
configurations. The repository's files are never modified.

A profile changes only *how long the system waits*, never *what an alert measures*:

- every rule's ``for:`` (and ``keep_firing_for:``), scaled and kept above a floor;
- Prometheus's evaluation interval (and any rule group ``interval:`` longer than it);
- Alertmanager's ``group_wait``, ``group_interval`` and ``repeat_interval`` throughout the route tree.

Range windows in expressions (``rate(x[5m])``, ``deriv(q[10m])``, ``max_over_time(up[1d])``) are left alone.
A window is part of what an alert measures: "5xx share over the last five minutes" and "5xx share
over the last thirty seconds" are different alerts, with different noise and different thresholds
that make sense. Shortening the window would test an alert nobody runs in production.

:data:`FAST` divides the waits by ten. It keeps every ``for:`` at 15 s or more, three of its 5 s
evaluation intervals, so that a blip seen in a single evaluation still does not fire, and never
sends Alertmanager notifications less than a second apart. :data:`REAL` changes nothing. No profile
lengthens a wait: a duration already below a profile's floor is kept as it is.
"""

from __future__ import annotations

import copy
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

__all__ = [
    "FAST",
    "PROFILES",
    "REAL",
    "AlertProfile",
    "DurationError",
    "format_duration",
    "parse_duration",
    "profile_named",
    "write_rules",
]

_UNITS_MS: dict[str, int] = {
    "y": 365 * 24 * 3600 * 1000,
    "w": 7 * 24 * 3600 * 1000,
    "d": 24 * 3600 * 1000,
    "h": 3600 * 1000,
    "m": 60 * 1000,
    "s": 1000,
    "ms": 1,
}
"""Prometheus duration units, largest first, in milliseconds (a year is 365 days, as in Prometheus)."""

_DURATION = re.compile("".join(rf"(?:(?P<{unit}>[0-9]+){unit})?" for unit in _UNITS_MS))

_RULE_DURATIONS = ("for", "keep_firing_for")
"""Keys of a rule whose durations a profile scales."""

_ALERTMANAGER_TIMINGS: dict[str, float] = {"group_wait": 30.0, "group_interval": 300.0, "repeat_interval": 4 * 3600.0}
"""Alertmanager's notification timings and their defaults (seconds) when the root route omits them."""


class DurationError(ValueError):
    """A text that is not a Prometheus duration, or a number of seconds that cannot be one."""


def parse_duration(text: str) -> float:
    """Seconds in a Prometheus duration such as ``"1h30m"``, ``"5m"``, ``"250ms"``, ``"1d"`` or ``"0"``.

    Units ``y`` (365 days), ``w``, ``d``, ``h``, ``m``, ``s`` and ``ms`` each appear at most once, largest
    first, with a whole non-negative number; a bare number other than ``0`` is not a duration.
    Raises :class:`DurationError` naming the text otherwise.
    """
    if not isinstance(text, str):
        raise DurationError(f"not a Prometheus duration: {text!r} (expected a string such as '5m' or '1h30m')")
    if text == "0":
        return 0.0
    match = _DURATION.fullmatch(text)
    if not text or match is None:
        raise DurationError(
            f"not a Prometheus duration: {text!r} (expected whole numbers with units y, w, d, h, m, s, ms, "
            "largest first, such as '5m', '1h30m' or '250ms')"
        )
    milliseconds = sum(int(value) * _UNITS_MS[unit] for unit, value in match.groupdict().items() if value)
    return milliseconds / 1000


def format_duration(seconds: float) -> str:
    """The shortest Prometheus duration for ``seconds``, rounded to whole milliseconds.

    ``30`` -> ``"30s"``, ``90`` -> ``"1m30s"``, ``3600`` -> ``"1h"``, ``0.25`` -> ``"250ms"``, ``0`` -> ``"0s"``.
    Raises :class:`DurationError` for a negative or non-finite number.
    """
    if isinstance(seconds, bool) or not isinstance(seconds, int | float) or not math.isfinite(seconds) or seconds < 0:
        raise DurationError(f"cannot write {seconds!r} seconds as a Prometheus duration (need a finite number >= 0)")
    remaining = round(seconds * 1000)
    if remaining == 0:
        return "0s"
    parts = []
    for unit, size in _UNITS_MS.items():
        count, remaining = divmod(remaining, size)
        if count:
            parts.append(f"{count}{unit}")
    return "".join(parts)


def _duration_text(value: Any) -> str:
    """A duration as YAML parsed it: ``for: 5m`` is a string, ``for: 0`` an integer."""
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return value


def _shortened(original: Any, scale: float, floor_s: float) -> Any:
    """``original`` scaled by ``scale``, at least ``floor_s`` but never longer than it was.

    Returns ``original`` itself when the duration does not change (so that an identity profile
    leaves the text as written), otherwise the new duration formatted by :func:`format_duration`.
    """
    seconds = parse_duration(_duration_text(original))
    new = min(seconds, max(seconds * scale, floor_s))
    if round(new * 1000) == round(seconds * 1000):
        return original
    return format_duration(new)


@dataclass(frozen=True)
class AlertProfile:
    """How much shorter alerting waits in a copy of the rules and configurations (see the module docstring).

    Attributes:
        name: what :func:`profile_named` and the generated files call the profile.
        for_scale: factor applied to every rule's ``for:`` and ``keep_firing_for:``.
        min_for_s: the scaled ``for:`` is never shorter than this (an absent or zero ``for:`` stays so,
            and a ``for:`` already shorter than this is kept).
        evaluation_interval_s: Prometheus's global ``evaluation_interval``, and the longest rule group
            ``interval:``, in seconds; ``None`` leaves both as they are.
        alertmanager_scale: factor applied to ``group_wait``, ``group_interval`` and ``repeat_interval``
            in Alertmanager's route and every nested route.
        min_alertmanager_s: the scaled Alertmanager timings are never shorter than this (unless they
            already were).
    """

    name: str
    for_scale: float = 1.0
    min_for_s: float = 0.0
    evaluation_interval_s: float | None = None
    alertmanager_scale: float = 1.0
    min_alertmanager_s: float = 1.0

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("an alert profile needs a name")
        for field, value in (("for_scale", self.for_scale), ("alertmanager_scale", self.alertmanager_scale)):
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"alert profile {self.name!r}: {field} must be a positive number, got {value!r}")
        for field, value in (("min_for_s", self.min_for_s), ("min_alertmanager_s", self.min_alertmanager_s)):
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"alert profile {self.name!r}: {field} must be a number >= 0, got {value!r}")
        interval = self.evaluation_interval_s
        if interval is not None and not (math.isfinite(interval) and interval >= 0.001):
            raise ValueError(
                f"alert profile {self.name!r}: evaluation_interval_s must be None or at least 1 ms, got {interval!r}"
            )

    def for_duration(self, original: str) -> str:
        """A rule's ``for:`` under this profile: ``FAST.for_duration("5m") == "30s"``, ``"2m"`` -> ``"15s"``.

        Scaled by :attr:`for_scale`, at least :attr:`min_for_s`, never longer than ``original``; a zero
        duration, or one the profile does not change, comes back as written. Raises
        :class:`DurationError` when ``original`` is not a Prometheus duration.
        """
        return _shortened(original, self.for_scale, self.min_for_s)

    def rule_file(self, document: dict | None) -> dict:
        """A deep copy of a parsed Prometheus rule file with this profile applied.

        Changes each rule's ``for:`` and ``keep_firing_for:`` (:meth:`for_duration`) and, when
        :attr:`evaluation_interval_s` is set, any group ``interval:`` longer than it. Everything else,
        expressions and their range windows included, is copied unchanged; no key is added.
        """
        profiled = copy.deepcopy(document) if document is not None else {}
        if not isinstance(profiled, dict):
            raise TypeError(f"a rule file is a mapping with a `groups` list, got {type(document).__name__}")
        for group in profiled.get("groups") or []:
            interval = self.evaluation_interval_s
            if interval is not None and parse_duration(_duration_text(group.get("interval", "0"))) > interval:
                group["interval"] = format_duration(interval)
            for rule in group.get("rules") or []:
                for key in _RULE_DURATIONS:
                    if key in rule:
                        rule[key] = self.for_duration(rule[key])
        return profiled

    def prometheus(self, config: dict) -> dict:
        """A deep copy of a parsed Prometheus configuration with ``global.evaluation_interval`` set.

        Set to :attr:`evaluation_interval_s` unless it is ``None``; scrape settings and everything else
        are copied unchanged.
        """
        profiled = copy.deepcopy(config)
        if self.evaluation_interval_s is not None:
            settings = profiled.get("global")
            if settings is None:
                settings = profiled["global"] = {}
            settings["evaluation_interval"] = format_duration(self.evaluation_interval_s)
        return profiled

    def alertmanager(self, config: dict) -> dict:
        """A deep copy of a parsed Alertmanager configuration with its notification timings shortened.

        ``group_wait``, ``group_interval`` and ``repeat_interval`` of ``route`` and of every nested
        ``routes`` entry are scaled by :attr:`alertmanager_scale`, kept at least
        :attr:`min_alertmanager_s` (never longer than they were) and formatted with
        :func:`format_duration`. A timing the root route leaves to Alertmanager's default (30s, 5m, 4h)
        is written out, shortened, when the profile changes it, since nested routes inherit it.
        """
        profiled = copy.deepcopy(config)
        root = profiled.get("route")
        if root is None:
            return profiled
        for key, default in _ALERTMANAGER_TIMINGS.items():
            # Written out unscaled here, scaled with the rest below.
            written = format_duration(default)
            if key not in root and _shortened(written, self.alertmanager_scale, self.min_alertmanager_s) != written:
                root[key] = written
        pending = [root]
        while pending:
            route = pending.pop()
            for key in _ALERTMANAGER_TIMINGS:
                if key in route:
                    route[key] = _shortened(route[key], self.alertmanager_scale, self.min_alertmanager_s)
            pending.extend(route.get("routes") or [])
        return profiled


REAL = AlertProfile("real")
"""The repository's timings, unchanged."""

FAST = AlertProfile(
    "fast", for_scale=0.1, min_for_s=15, evaluation_interval_s=5, alertmanager_scale=0.1, min_alertmanager_s=1
)
"""Waits divided by ten: ``for:`` at least 15 s (three 5 s evaluations), Alertmanager timings at least 1 s."""

PROFILES: dict[str, AlertProfile] = {profile.name: profile for profile in (REAL, FAST)}
"""Every profile by name."""


def profile_named(name: str) -> AlertProfile:
    """The profile called ``name`` in :data:`PROFILES`; raises ValueError listing the known names otherwise."""
    try:
        return PROFILES[name]
    except KeyError:
        raise ValueError(f"unknown alert profile {name!r}; known profiles: {', '.join(sorted(PROFILES))}") from None


class _RuleDumper(yaml.SafeDumper):
    """Indents lists under their key and writes multi-line strings (PromQL) as literal blocks, as the rule files do."""

    def increase_indent(self, flow: bool = False, indentless: bool = False) -> None:
        super().increase_indent(flow, False)


def _represent_string(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_RuleDumper.add_representer(str, _represent_string)


_REPO = Path(__file__).resolve().parent.parent


def _header(profile: AlertProfile, source: Path) -> str:
    """The first line of a generated rule file; names the source relative to the repository when inside it."""
    resolved = source.resolve()
    if resolved.is_relative_to(_REPO):
        source = resolved.relative_to(_REPO)
    return f"# Generated from {source} by the {profile.name} alert profile (collector/alert_profile.py); do not edit.\n"


def write_rules(profile: AlertProfile, source_dir: Path, target_dir: Path) -> list[Path]:
    """Write every ``*.yml`` rule file of ``source_dir``, profiled, to ``target_dir`` (created if needed).

    Each file starts with a comment naming its source and the profile and asking not to edit it. Any
    ``*.yml`` already in ``target_dir`` without a source of the same name is removed, so that a rule
    file deleted from the source does not keep firing from the copy. Each file is replaced atomically,
    so a Prometheus reloading meanwhile never reads half a file. Returns the written paths, sorted.
    Refuses (ValueError) to write into ``source_dir`` itself.
    """
    source_dir, target_dir = Path(source_dir), Path(target_dir)
    if target_dir.resolve() == source_dir.resolve():
        raise ValueError(f"refusing to overwrite the source rule files in {source_dir}: write the profile elsewhere")
    sources = sorted(path for path in source_dir.glob("*.yml") if path.is_file())
    target_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for source in sources:
        profiled = profile.rule_file(yaml.safe_load(source.read_text(encoding="utf-8")))
        body = yaml.dump(profiled, Dumper=_RuleDumper, sort_keys=False, allow_unicode=True, width=120)
        target = target_dir / source.name
        partial = target.with_name(f".{target.name}.tmp")
        partial.write_text(_header(profile, source) + body, encoding="utf-8")
        os.replace(partial, target)
        written.append(target)
    names = {source.name for source in sources}
    for stale in target_dir.glob("*.yml"):
        if stale.name not in names:
            stale.unlink()
    return written
