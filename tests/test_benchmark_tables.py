"""The benchmark tables read what a reader needs from repeated, interleaved runs.

The variants of a benchmark run interleaved, so the repetitions of one index ran side by side:
the tables show, beside the ratio of the medians that a target is read on, the median and range
of the per-repetition ratios, which cancel the machine's drift between repetitions.
"""

from __future__ import annotations

import pytest

from benchmarks import http_load, report


def _run(requests_per_s: float) -> http_load.Run:
    return http_load.Run(
        served=int(requests_per_s * 10),
        requests=int(requests_per_s * 10),
        seconds=10.0,
        p50_ms=1.0,
        p99_ms=2.0,
        errors=0,
        server_cpu_us=250.0,
        request_thread_cpu_us=200.0,
        spans=None,
        counted=None,
    )


def _row(table: str, variant: str) -> list[str]:
    line = next(line for line in table.splitlines() if line.startswith(f"| {variant} |"))
    return [cell.strip() for cell in line.strip("|").split("|")]


def test_per_repetition_ratios_divide_each_repetition_by_the_base_of_the_same_repetition() -> None:
    """Ratio i is value i over base i; the spread shows their median, then their range."""
    ratios = report.paired_ratios([90.0, 80.0, 120.0], [100.0, 100.0, 100.0])
    assert ratios == pytest.approx([0.9, 0.8, 1.2])
    assert report.ratio_spread(ratios) == "0.90 (0.80\u20131.20)"


def test_per_repetition_ratios_refuse_runs_that_cannot_be_paired() -> None:
    """A variant with a repetition missing is an error, not a silently shorter comparison."""
    with pytest.raises(ValueError, match="3 repetitions cannot be paired with 2"):
        report.paired_ratios([1.0, 2.0, 3.0], [1.0, 2.0])


def test_the_load_table_shows_the_per_repetition_ratio_beside_the_ratio_of_medians() -> None:
    """A drifting machine: none and spyglass both slow down, the paired ratio stays put.

    none's repetitions are 7,000, 5,000 and 6,000 requests/s; spyglass's 6,300, 4,500 and 5,100:
    the ratio of the medians is 5,100 / 6,000 = 0.85, the per-repetition ratios 0.90, 0.90 and 0.85.
    """
    none = http_load.VariantResult("none", [_run(7000), _run(5000), _run(6000)])
    spyglass = http_load.VariantResult("spyglass", [_run(6300), _run(4500), _run(5100)])
    table = http_load.render_table([none, spyglass])
    header = _row(table, "Variant")
    row = _row(table, "spyglass")
    assert row[header.index("\u00d7 none (of medians)")] == "0.85"
    assert row[header.index("\u00d7 none per repetition: median (min\u2013max)")] == "0.90 (0.85\u20130.90)"
    assert _row(table, "none")[header.index("\u00d7 none per repetition: median (min\u2013max)")] == "\u2013"


def test_worker_instructions_price_each_part_as_spyglass_minus_spyglass_without_it() -> None:
    """A part costs spyglass's count minus its count with the part's setting off, and a share of what spyglass adds.

    The parts' counts are priced in their own table: the variants table and the summary figures
    keep the load benchmark's variants only.
    """
    from benchmarks import worker_instructions as wi

    counts = {
        "none": 900_000.0,
        "spyglass": 1_100_000.0,
        wi.part_variant("log export"): 1_060_000.0,
        wi.part_variant("traceresponse header"): 1_090_000.0,
    }
    section = wi.render_section(counts, small=512, large=1536, warmup=200)
    log_row = _row(section, "log export: " + wi.PARTS["log export"].description)
    assert log_row[1:] == ["`OTEL_LOGS_EXPORTER=none`", "1,060,000", "+40,000", "20%"]
    header_row = _row(section, "traceresponse header: " + wi.PARTS["traceresponse header"].description)
    assert header_row[1:] == ["`SPYGLASS_TRACERESPONSE=false`", "1,090,000", "+10,000", "5%"]
    assert "span export" not in section.split("## What each part costs")[1].split("## Machine")[0]
    variants_table = wi.render_table(counts)
    assert [line.split("|")[1].strip() for line in variants_table.splitlines()[2:]] == ["none", "spyglass"]
    assert [figure.measure for figure in wi.figures(counts)] == ["instructions/request, spyglass"]


def test_worker_instructions_without_parts_have_no_parts_table() -> None:
    """Counting no part (or not counting spyglass) leaves the section without the parts table."""
    from benchmarks import worker_instructions as wi

    assert wi.render_parts({"none": 900_000.0, "spyglass": 1_100_000.0}) == []
    section = wi.render_section({"none": 900_000.0, "floor": 1_400_000.0}, small=512, large=1536, warmup=200)
    assert "What each part costs" not in section


def test_the_load_table_shows_how_much_of_the_server_cpu_the_request_threads_used() -> None:
    """Beside the server's CPU per request, the part its workers' request threads used, and its share.

    The rest ran off the request's path (the master, export threads): 200 of 250 µs is 80 %.
    """
    none = http_load.VariantResult("none", [_run(7000)])
    table = http_load.render_table([none])
    header = _row(table, "Variant")
    row = _row(table, "none")
    assert row[header.index("Server CPU \u00b5s/req")] == "250"
    assert row[header.index("On request threads \u00b5s/req")] == "200 (80%)"


def test_server_cpu_readings_subtract_part_by_part() -> None:
    """The CPU of a timed phase is the reading after it minus the reading before, total and request threads alike."""
    used = http_load.ServerCpu(total=5.0, request_threads=4.0) - http_load.ServerCpu(total=2.0, request_threads=1.5)
    assert used == http_load.ServerCpu(total=3.0, request_threads=2.5)
