"""The multi-process metric directory: exemplars across processes, and folding in exited workers."""

from __future__ import annotations

import os
import struct
import threading
import time
from pathlib import Path

from prometheus_client import CollectorRegistry, values
from prometheus_client.mmap_dict import MmapedDict
from prometheus_client.multiprocess import MultiProcessCollector

from spyglass.metrics import multiprocess
from spyglass.metrics.cells import MmapCell, cell_of
from spyglass.metrics.exemplars import ExemplarFile, attach_exemplars, exemplar_key, read_exemplars
from spyglass.metrics.instruments import EXEMPLAR_INTERVAL_S, CeleryMetrics, HttpServerMetrics

BOUNDS = (0.1, 1.0, float("inf"))
LABELS = ("http_request_method", "http_route", "http_response_status_code")


def record(store: ExemplarFile, value: float, trace: int, timestamp: float) -> None:
    store.record(
        "http_server_request_duration_seconds",
        ("GET", "/x", "200"),
        LABELS,
        BOUNDS,
        value,
        timestamp,
        trace.to_bytes(16, "big"),
        (trace & 0xFFFF).to_bytes(8, "big"),
    )


def bucket_key(le: str) -> str:
    return exemplar_key(
        "http_server_request_duration_seconds",
        [("http_request_method", "GET"), ("http_route", "/x"), ("http_response_status_code", "200"), ("le", le)],
    )


def test_newest_exemplar_per_bucket_wins_across_processes(tmp_path: Path) -> None:
    """Two processes write the same bucket; the reader returns the most recent one, per bucket."""
    parent = ExemplarFile(str(tmp_path))
    record(parent, 0.05, trace=1, timestamp=100.0)
    child = os.fork()
    if child == 0:  # pragma: no cover - runs in the forked child
        try:
            record(parent, 0.07, trace=2, timestamp=200.0)  # same object: must write the child's own file
            record(parent, 0.5, trace=3, timestamp=50.0)
        finally:
            os._exit(0)
    os.waitpid(child, 0)
    files = sorted(path.name for path in tmp_path.glob("*.exm"))
    assert files == sorted([f"exemplars_{os.getpid()}.exm", f"exemplars_{child}.exm"])
    exemplars = read_exemplars(str(tmp_path))
    assert exemplars[bucket_key("0.1")].labels["trace_id"] == f"{2:032x}"
    assert exemplars[bucket_key("0.1")].value == 0.07
    assert exemplars[bucket_key("1.0")].labels["trace_id"] == f"{3:032x}"


def test_a_record_caught_mid_write_is_skipped(tmp_path: Path) -> None:
    """An odd sequence number (writer in progress) means no exemplar rather than a torn one."""
    store = ExemplarFile(str(tmp_path))
    record(store, 0.05, trace=9, timestamp=1.0)
    store.close()
    path = next(tmp_path.glob("*.exm"))
    data = bytearray(path.read_bytes())
    key = bucket_key("0.1").encode()
    key_at = data.index(key)
    padded = len(key) + (8 - (len(key) + 4) % 8) % 8
    sequence_at = key_at + padded
    (sequence,) = struct.unpack_from("<Q", data, sequence_at)
    assert sequence % 2 == 0 and sequence > 0
    struct.pack_into("<Q", data, sequence_at, sequence + 1)
    path.write_bytes(bytes(data))
    assert read_exemplars(str(tmp_path)) == {}


def test_exemplars_attach_to_the_matching_merged_bucket(tmp_path: Path) -> None:
    """The collector output gets each exemplar on the bucket sample with the same labels and `le`."""
    store = ExemplarFile(str(tmp_path))
    record(store, 0.5, trace=5, timestamp=10.0)
    families = [
        _histogram_family({"le": "0.1"}, {"le": "1.0"}, {"le": "+Inf"}),
    ]
    (family,) = attach_exemplars(families, read_exemplars(str(tmp_path)))
    by_le = {sample.labels["le"]: sample.exemplar for sample in family.samples}
    assert by_le["0.1"] is None and by_le["+Inf"] is None
    assert by_le["1.0"].labels["trace_id"] == f"{5:032x}"


def _histogram_family(*bucket_labels: dict):
    from prometheus_client.core import Metric

    family = Metric("http_server_request_duration_seconds", "help", "histogram")
    base = {"http_request_method": "GET", "http_route": "/x", "http_response_status_code": "200"}
    for extra in bucket_labels:
        family.add_sample("http_server_request_duration_seconds_bucket", {**base, **extra}, 1.0)
    return family


def test_folding_in_an_exited_process_keeps_totals_and_removes_its_files(tmp_path: Path) -> None:
    """Counter totals stay the same across compaction; the dead pid's files are gone."""
    directory = str(tmp_path)
    key = '["requests", "requests_total", {"route": "/a"}, "help"]'
    for pid, value in ((111, 3.0), (222, 4.0)):
        values = MmapedDict(str(tmp_path / f"counter_{pid}.db"))
        values.write_value(key, value, 0.0)
        values.close()
    live_gauge = MmapedDict(str(tmp_path / "gauge_livesum_111.db"))
    live_gauge.write_value('["active", "active", {}, "help"]', 1.0, 0.0)
    live_gauge.close()
    store = ExemplarFile(directory, "111")
    record(store, 0.05, trace=7, timestamp=5.0)
    store.close()

    def total() -> float:
        collected = MultiProcessCollector(None, path=directory).collect()
        return sum(s.value for family in collected for s in family.samples if s.name == "requests_total")

    assert total() == 7.0
    multiprocess.compact_dead_process(111, directory)
    assert total() == 7.0
    multiprocess.compact_dead_process(222, directory)
    assert total() == 7.0
    remaining = sorted(path.name for path in tmp_path.iterdir())
    assert remaining == ["counter_archive.db", "exemplars_archive.exm"]
    assert read_exemplars(directory)[bucket_key("0.1")].labels["trace_id"] == f"{7:032x}"


def test_prepare_directory_empties_what_a_previous_run_left(tmp_path: Path) -> None:
    """Stale value files from an earlier run would be summed into the new one: start empty."""
    (tmp_path / "counter_999.db").write_bytes(b"stale")
    (tmp_path / "nested").mkdir()
    multiprocess.prepare_directory(str(tmp_path))
    assert list(tmp_path.iterdir()) == []


def test_a_scrape_while_a_worker_creates_its_file_still_succeeds(tmp_path: Path) -> None:
    """A value file caught empty (a worker starting) is skipped; the other processes' values are served."""
    from spyglass.metrics.collectors import MultiProcessExemplarCollector

    key = '["requests", "requests_total", {"route": "/a"}, "help"]'
    values = MmapedDict(str(tmp_path / "counter_111.db"))
    values.write_value(key, 3.0, 0.0)
    values.close()
    (tmp_path / f"counter_{os.getpid()}.db").touch()  # a live process's file, created, not yet sized
    (tmp_path / "counter_999999999.db").touch()  # a process that died creating its file
    collected = list(MultiProcessExemplarCollector(str(tmp_path)).collect())
    assert [s.value for family in collected for s in family.samples if s.name == "requests_total"] == [3.0]
    multiprocess.compact_exited_processes(str(tmp_path))
    assert not (tmp_path / "counter_999999999.db").exists()
    assert (tmp_path / f"counter_{os.getpid()}.db").exists()


def test_a_thousand_exited_processes_leave_only_archive_files_and_keep_their_totals(tmp_path: Path) -> None:
    """Folding in 1,000 exited pool processes: totals and newest exemplar kept, no per-process file left.

    A scrape then reads a fixed number of files, however many processes have lived.
    """
    directory = str(tmp_path)
    key = '["tasks", "tasks_total", {"task_name": "ok"}, "help"]'
    first_dead_pid = 4_000_000  # above pid_max: no such process
    for offset in range(1_000):
        pid = first_dead_pid + offset
        values = MmapedDict(str(tmp_path / f"counter_{pid}.db"))
        values.write_value(key, 1.0, 0.0)
        values.close()
        store = ExemplarFile(directory, str(pid))
        record(store, 0.05, trace=offset + 1, timestamp=float(offset))
        store.close()
    folded = multiprocess.compact_exited_processes(directory)
    assert len(folded) == 1_000
    assert sorted(path.name for path in tmp_path.iterdir()) == ["counter_archive.db", "exemplars_archive.exm"]
    collected = MultiProcessCollector(None, path=directory).collect()
    assert sum(s.value for family in collected for s in family.samples if s.name == "tasks_total") == 1_000
    assert read_exemplars(directory)[bucket_key("0.1")].labels["trace_id"] == f"{1_000:032x}"


def test_the_serving_process_folds_in_exited_processes_in_the_background(tmp_path: Path) -> None:
    """The compactor thread folds in a dead process's files within its interval, without a scrape."""
    values = MmapedDict(str(tmp_path / "counter_4000001.db"))
    values.write_value('["tasks", "tasks_total", {}, "help"]', 2.0, 0.0)
    values.close()
    compactor = multiprocess.ExitedProcessCompactor(str(tmp_path), interval=0.05).start()
    try:
        deadline = time.monotonic() + 5
        while (tmp_path / "counter_4000001.db").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        compactor.stop()
    assert sorted(path.name for path in tmp_path.iterdir()) == ["counter_archive.db"]


def test_values_written_through_cells_are_the_files_prometheus_client_reads(tmp_path: Path, monkeypatch) -> None:
    """A cell writes its value into the process's own file, and a forked child into the child's file.

    The serving process reads them with prometheus_client's own collector: the sum is exact, and a
    child never writes into its parent's file.
    """
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    value_class = values.MultiProcessValue()
    counted = value_class("counter", "tasks", "tasks_total", ("queue",), ("q",), "Tasks.")
    cell = cell_of(counted)
    assert isinstance(cell, MmapCell)
    cell.inc(2)
    child = os.fork()
    if child == 0:  # pragma: no cover - runs in the forked child
        try:
            cell.inc(5)
        finally:
            os._exit(0)
    os.waitpid(child, 0)
    cell.inc(1)

    def read(pid: int) -> float:
        stored = MmapedDict.read_all_values_from_file(str(tmp_path / f"counter_{pid}.db"))
        return {key: value for key, value, _timestamp, _position in stored}[counted._key]

    assert read(os.getpid()) == 3.0
    assert read(child) == 5.0
    collected = MultiProcessCollector(None, path=str(tmp_path)).collect()
    assert [sample.value for family in collected for sample in family.samples if sample.name == "tasks_total"] == [8.0]
    again = value_class("counter", "tasks", "tasks_total", ("queue",), ("q",), "Tasks.")
    assert again.get() == 3.0  # what a new value object of this process starts from


def test_a_gauge_cell_sets_and_adds(tmp_path: Path, monkeypatch) -> None:
    """``set`` then ``inc`` on a gauge cell leave the file holding the sum, as the library would."""
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    value_class = values.MultiProcessValue()
    gauge = value_class("gauge", "last", "last_seconds", (), (), "Last.", multiprocess_mode="max")
    cell = cell_of(gauge)
    cell.set(10.0)
    cell.inc(-2.5)
    assert value_class("gauge", "last", "last_seconds", (), (), "Last.", multiprocess_mode="max").get() == 7.5


def test_two_cells_of_one_value_lose_no_update(tmp_path: Path, monkeypatch) -> None:
    """Two threads that each create the cell of a new label set write to one value: both updates count.

    A threads pool or a gthread worker can create two cells of the same value at the same moment;
    each adds to what the file holds, not to a private copy.
    """
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    value_class = values.MultiProcessValue()
    counted = value_class("counter", "tasks", "tasks_total", ("queue",), ("q",), "Tasks.")
    first, second = cell_of(counted), cell_of(counted)
    first.inc(1)
    second.inc(1)
    first.inc(1)
    collected = MultiProcessCollector(None, path=str(tmp_path)).collect()
    assert [sample.value for family in collected for sample in family.samples if sample.name == "tasks_total"] == [3.0]


def test_threads_recording_a_new_task_at_once_count_every_run(tmp_path: Path, monkeypatch) -> None:
    """Many threads finishing the first runs of a task together: the runtime count is the number of runs."""
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    monkeypatch.setattr(values, "ValueClass", values.MultiProcessValue())
    registry = CollectorRegistry()
    threads_count, rounds = 8, 50
    for _round in range(rounds):
        metrics = CeleryMetrics(registry=None)
        barrier = threading.Barrier(threads_count)

        def run(metrics: CeleryMetrics = metrics, barrier: threading.Barrier = barrier) -> None:
            barrier.wait()
            metrics.started("tasks.new", "celery", 0.001)
            metrics.finished("tasks.new", "celery", "success", 0.002)

        workers = [threading.Thread(target=run) for _ in range(threads_count)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
    MultiProcessCollector(registry, path=str(tmp_path))
    total = threads_count * rounds
    assert (
        registry.get_sample_value("celery_task_runtime_seconds_count", {"task_name": "tasks.new", "queue": "celery"})
        == total
    )
    assert (
        registry.get_sample_value("celery_task_queue_wait_seconds_count", {"task_name": "tasks.new", "queue": "celery"})
        == total
    )
    assert (
        registry.get_sample_value(
            "celery_task_completed_total", {"task_name": "tasks.new", "queue": "celery", "outcome": "success"}
        )
        == total
    )


def test_single_process_values_are_used_as_they_are() -> None:
    """Outside multi-process mode the library's own value (a float behind a lock) is the cell."""
    plain = values.MutexValue("counter", "n", "n_total", (), (), "N.")
    assert cell_of(plain) is plain


def _bucket_exemplars(registry: CollectorRegistry) -> dict[str, str]:
    """Trace id of the exemplar on each bucket of the request-duration histogram, by ``le``."""
    (family,) = [family for family in registry.collect() if family.name == "http_server_request_duration_seconds"]
    return {
        sample.labels["le"]: sample.exemplar.labels["trace_id"]
        for sample in family.samples
        if sample.name.endswith("_bucket") and sample.exemplar is not None
    }


def test_a_buckets_exemplar_is_replaced_at_most_once_per_sample_interval() -> None:
    """Sampled requests that follow within EXEMPLAR_INTERVAL_S keep the bucket's exemplar; later ones
    replace it, and each bucket has its own interval.
    """
    registry = CollectorRegistry()
    metrics = HttpServerMetrics(registry)
    ids = {number: (f"{number:032x}", f"{number:016x}") for number in range(1, 5)}
    metrics.observe("GET", "/x", "200", 0.003, *ids[1])
    metrics.observe("GET", "/x", "200", 0.004, *ids[2])  # same bucket, within the interval
    metrics.observe("GET", "/x", "200", 7.0, *ids[3])  # another bucket: its own interval
    assert _bucket_exemplars(registry) == {"0.005": ids[1][0], "7.5": ids[3][0]}
    time.sleep(EXEMPLAR_INTERVAL_S + 0.02)
    metrics.observe("GET", "/x", "200", 0.004, *ids[4])
    assert _bucket_exemplars(registry) == {"0.005": ids[4][0], "7.5": ids[3][0]}
