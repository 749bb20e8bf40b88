"""Collectors that run in the process serving the metrics endpoint."""

from __future__ import annotations

import glob
import os
import platform
import re
import resource
import threading
from collections.abc import Iterator, Mapping

import psutil
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector

from spyglass.catalog import by_name
from spyglass.metrics.exemplars import attach_exemplars, read_exemplars
from spyglass.metrics.multiprocess import scrape_lock

__all__ = ["MultiProcessExemplarCollector", "ProcessTreeCollector", "ResourceInfoCollector"]

_LABEL_UNSAFE = re.compile(r"[^a-zA-Z0-9_]")
_HEADER_SIZE = 8  # prometheus_client's value files start with the number of bytes in use


def _label_name(attribute: str) -> str:
    name = _LABEL_UNSAFE.sub("_", attribute)
    return "_" + name if name[:1].isdigit() else name


class ResourceInfoCollector:
    """``target_info`` (the OpenTelemetry resource as labels) and ``spyglass_build_info``."""

    def __init__(self, resource_attributes: Mapping[str, str], spyglass_version: str) -> None:
        self._target = {_label_name(key): str(value) for key, value in resource_attributes.items()}
        self._build = {"version": spyglass_version, "python_version": platform.python_version()}

    def collect(self) -> Iterator[Metric]:
        """Yield the metric families of this collector."""
        target = InfoMetricFamily("target", by_name("target_info").description)
        target.add_metric([], self._target)
        yield target
        build = InfoMetricFamily("spyglass_build", by_name("spyglass_build_info").description)
        build.add_metric([], self._build)
        yield build


class MultiProcessExemplarCollector(MultiProcessCollector):
    """prometheus_client's multi-process collector, plus exemplars from every process."""

    def __init__(self, path: str) -> None:
        super().__init__(registry=None, path=path)
        self._directory = path

    def collect(self) -> Iterator[Metric]:  # type: ignore[override]
        """Merge every process's files and attach the newest exemplar of each bucket."""
        with scrape_lock():
            families = list(self.merge(_complete_files(self._directory), accumulate=True))
            exemplars = read_exemplars(self._directory)
        return iter(attach_exemplars(families, exemplars))


def _complete_files(directory: str) -> list[str]:
    """The value files of ``directory`` that have their header.

    A process creates its file empty and then sizes it: prometheus_client's reader fails on a file
    caught in between (a worker starting during a scrape), which would fail the whole scrape.
    """
    complete = []
    for path in glob.glob(os.path.join(directory, "*.db")):
        try:
            if os.path.getsize(path) >= _HEADER_SIZE:
                complete.append(path)
        except FileNotFoundError:
            continue
    return complete


class ProcessTreeCollector:
    """``process_*`` metrics for a serving process and all its worker processes together.

    CPU time includes exited workers (the kernel adds a reaped child's time to its parent), and the
    counter is kept monotonic across the moment a worker exits and is reaped.
    """

    def __init__(self) -> None:
        self._root = psutil.Process()
        self._lock = threading.Lock()
        self._cpu_high_water = 0.0

    def _living_children(self) -> list[psutil.Process]:
        try:
            return self._root.children(recursive=True)
        except psutil.Error:
            return []

    def collect(self) -> Iterator[Metric]:
        """Yield the metric families of this collector."""
        cpu = rss = vms = fds = start_time = 0.0
        children = self._living_children()
        for index, process in enumerate([self._root, *children]):
            try:
                with process.oneshot():
                    times = process.cpu_times()
                    memory = process.memory_info()
                    open_fds = process.num_fds()
            except psutil.Error:
                continue  # exited between listing and reading
            cpu += times.user + times.system + times.children_user + times.children_system
            rss += memory.rss
            vms += memory.vms
            fds += open_fds
            if index == 0:
                start_time = process.create_time()
        with self._lock:
            self._cpu_high_water = max(self._cpu_high_water, cpu)
            cpu = self._cpu_high_water
        yield CounterMetricFamily("process_cpu_seconds", by_name("process_cpu_seconds_total").description, value=cpu)
        yield GaugeMetricFamily(
            "process_resident_memory_bytes", by_name("process_resident_memory_bytes").description, value=rss
        )
        yield GaugeMetricFamily(
            "process_virtual_memory_bytes", by_name("process_virtual_memory_bytes").description, value=vms
        )
        yield GaugeMetricFamily("process_open_fds", by_name("process_open_fds").description, value=fds)
        soft_limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        yield GaugeMetricFamily("process_max_fds", by_name("process_max_fds").description, value=soft_limit)
        yield GaugeMetricFamily(
            "process_start_time_seconds", by_name("process_start_time_seconds").description, value=start_time
        )
        yield GaugeMetricFamily(
            "spyglass_worker_processes", by_name("spyglass_worker_processes").description, value=len(children)
        )

    def describe(self) -> Iterator[Metric]:
        """Nothing to describe ahead of time (keeps registration cheap)."""
        return iter(())
