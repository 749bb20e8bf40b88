"""The SLO dashboard: for each SLO of ``collector/prometheus/slos.yaml``, its error budget and burn rates.

It reads the series the generated rules record (``collector/prometheus/rules/slo.yml``): the error
ratio over each window, the objective, the error budget and what remains of it over the period.
The four "what pages" panels show exactly the conditions of the multi-window multi-burn-rate alerts:
the lower of a long and a short window's burn rate, against the factor that fires.
"""

from __future__ import annotations

from collector.slo_rules import PAGE, TICKET, WINDOWS, BurnCondition, load_spec
from dashboards.frame import datasource_variable, label_variable, new_dashboard
from dashboards.panels import Query, stat_panel, timeseries_panel
from dashboards.sdk import dashboard

__all__ = ["BURN_CONDITIONS", "build", "slo_alerts"]

BURN_CONDITIONS: tuple[tuple[str, BurnCondition, str], ...] = (
    ("Page: fast burn (1h & 5m)", PAGE[0], "pages: 2 % of a 30-day budget spent in one hour"),
    ("Page: slow burn (6h & 30m)", PAGE[1], "pages: 5 % of the budget spent in six hours"),
    ("Ticket: 1d & 2h", TICKET[0], "opens a ticket: 10 % of the budget spent in a day"),
    ("Ticket: 3d & 6h", TICKET[1], "opens a ticket: the budget would run out within the period"),
)
"""(panel title, the alert condition of collector.slo_rules it shows, what crossing it means)."""


def slo_alerts() -> tuple[str, ...]:
    """The burn-rate alert of each SLO in the spec (critical pages, warning opens a ticket)."""
    return tuple(slo.alert for slo in load_spec().slos)


_SELECTOR = '{slo=~"$slo"}'
_BUDGET = f"slo:error_budget:ratio{_SELECTOR}"


def _burn_rate(window: str) -> str:
    return f"slo:sli_error:ratio_rate{window}{_SELECTOR} / on (slo, job) {_BUDGET}"


def _condition(long_window: str, short_window: str) -> str:
    both = f'{{__name__=~"slo:sli_error:ratio_rate({long_window}|{short_window})", slo=~"$slo"}}'
    return f"min by (slo, job) ({both}) / on (slo, job) {_BUDGET}"


def build() -> dashboard.Dashboard:
    """The SLO dashboard (uid ``spyglass-slo``)."""
    alerts = slo_alerts()
    board = (
        new_dashboard(
            "slo",
            "SLOs",
            "Error budgets of the service level objectives declared in collector/prometheus/slos.yaml, how fast "
            "each is burning over the alert windows, and how close each alert condition is to paging. A burn "
            "rate of 1 spends the budget exactly over the 30-day period.",
        )
        .time("now-24h", "now")
        .with_variable(datasource_variable())
        .with_variable(label_variable("slo", "SLO", "slo:objective:ratio", "slo"))
        .with_row(dashboard.Row("Error budget"))
        .with_panel(
            stat_panel(
                "Error budget remaining",
                "Share of the 30-day error budget not yet spent: 100 % is untouched, 0 % is spent (the objective "
                "is missed over the period). Red below 25 %.",
                "percentunit",
                [Query(f"slo:error_budget_remaining:ratio{_SELECTOR}", "{{slo}}")],
                alerts=alerts,
                thresholds=[0.25, 0.5],
                higher_is_worse=False,
                width=12,
                height=6,
            )
        )
        .with_panel(
            stat_panel(
                "Objective",
                "The objective of each SLO: the share of good events it promises over 30 days.",
                "percentunit",
                [Query(f"slo:objective:ratio{_SELECTOR}", "{{slo}}")],
                decimals=2,
                width=6,
                height=6,
            )
        )
        .with_panel(
            stat_panel(
                "Error ratio over 30 days",
                "Share of bad events over the period, to compare with the budget (1 - objective).",
                "percentunit",
                [Query(f"slo:sli_error:ratio_rate30d{_SELECTOR}", "{{slo}}")],
                decimals=3,
                width=6,
                height=6,
            )
        )
        .with_panel(
            timeseries_panel(
                "Error budget remaining over time",
                "How the remaining budget moved: a steep fall is an incident, a steady slope a chronic problem.",
                "percentunit",
                [Query(f"slo:error_budget_remaining:ratio{_SELECTOR}", "{{slo}}")],
                alerts=alerts,
                width=24,
            )
        )
        .with_row(dashboard.Row("Burn rates"))
        .with_panel(
            timeseries_panel(
                "Burn rate by window",
                "Error ratio over each alert window divided by the error budget: 1 spends the budget in exactly "
                "30 days, 14.4 spends 2 % of it per hour. Dashed: the alert factors 1, 3, 6 and 14.4.",
                "x",
                [Query(_burn_rate(window), f"{{{{slo}}}} {window}") for window in WINDOWS],
                alerts=alerts,
                thresholds=[condition.factor for _title, condition, _meaning in BURN_CONDITIONS],
                width=24,
                height=9,
            )
        )
        .with_row(dashboard.Row("What pages"))
    )
    for title, condition, meaning in BURN_CONDITIONS:
        board = board.with_panel(
            timeseries_panel(
                title,
                f"The lower of the {condition.long} and {condition.short} burn rates: the alert fires while it is "
                f"above {condition.factor:g} (dashed), which {meaning}. Both windows must burn, so a brief spike "
                "does not page and the alert clears soon after the problem does.",
                "x",
                [Query(_condition(condition.long, condition.short), "{{slo}}")],
                alerts=alerts,
                thresholds=[condition.factor],
                minimum=0,
                width=12,
            )
        )
    return board
