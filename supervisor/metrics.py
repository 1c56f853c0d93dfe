"""Prometheus metrics of the supervisor (prometheus-client), exposed by the gateway at /metrics.

Counters and histograms are updated when things happen (a frame stored, a stage loaded, a probe
finished, a tick worked); gauges are read from the supervisor's state when scraped."""
from __future__ import annotations

import time
from collections import deque
from typing import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

STAGE_BUCKETS = (0.1, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600)
TICK_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5)


class Metrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        self.frames = Counter("pose_frames_processed", "frames stored in the ledger", registry=self.registry)
        self.stage_seconds = Histogram("pose_stage_load_seconds", "time to load each engine stage", ["stage"],
                                       buckets=STAGE_BUCKETS, registry=self.registry)
        self.probes = Counter("pose_probe_results", "detector probe outcomes", ["result"], registry=self.registry)
        self.tick_seconds = Histogram("pose_supervisor_tick_seconds", "work done in one supervisor loop tick",
                                      buckets=TICK_BUCKETS, registry=self.registry)
        self.recent_ticks: deque = deque(maxlen=600)

    def frame_stored(self) -> None:
        self.frames.inc()

    def stage_loaded(self, stage: str, seconds: float) -> None:
        self.stage_seconds.labels(stage).observe(seconds)

    def probe_finished(self, ok: bool) -> None:
        self.probes.labels("ok" if ok else "failed").inc()

    def ticked(self, seconds: float) -> None:
        self.tick_seconds.observe(seconds)
        self.recent_ticks.append((time.monotonic(), seconds))

    def loop_lag_s(self) -> float:
        """The longest tick of the last minute: how late a message or a deadline may be handled."""
        horizon = time.monotonic() - 60
        return max((s for at, s in self.recent_ticks if at >= horizon), default=0.0)

    def watch(self, read_state: Callable[[], dict]) -> None:
        """Gauges read at scrape time from `read_state()`."""
        self.registry.register(_StateCollector(read_state, self))

    def exposition(self) -> str:
        return generate_latest(self.registry).decode()


class _StateCollector:
    def __init__(self, read_state: Callable[[], dict], metrics: Metrics):
        self.read_state, self.metrics = read_state, metrics

    def collect(self) -> Iterable:
        state = self.read_state()
        status = GaugeMetricFamily("pose_status", "service status (1 for the current one)", labels=["status"])
        for word in ("ready", "degraded", "loading", "fatal"):
            status.add_metric([word], 1.0 if state["status"] == word else 0.0)
        yield status
        yield _gauge("pose_worker_generation", "worker generation", state["generation"])
        yield _gauge("pose_rung_index", "fallback ladder rung (0 = top)", state["rung_index"])
        yield _gauge("pose_queue_depth", "jobs queued or running", state["queue_depth"])
        yield _gauge("pose_worker_rss_bytes", "worker resident memory", state["worker_rss"] or 0)
        yield _gauge("pose_supervisor_loop_lag_seconds", "longest supervisor tick in the last minute",
                     self.metrics.loop_lag_s())
        jobs = GaugeMetricFamily("pose_jobs", "jobs in the ledger", labels=["state"])
        for name, count in state["jobs_by_state"].items():
            jobs.add_metric([name], count)
        yield jobs
        deaths = CounterMetricFamily("pose_worker_deaths", "worker and probe deaths (and in-process incidents)",
                                     labels=["cause"])
        for cause, count in state["deaths_by_cause"].items():
            deaths.add_metric([cause], count)
        yield deaths
        dropped = CounterMetricFamily("pose_messages_dropped", "messages refused or no longer wanted", labels=["kind"])
        for kind, count in state["messages"].items():
            dropped.add_metric([kind], count)
        yield dropped
        fps = GaugeMetricFamily("pose_job_fps", "frames per second of the job on the worker", labels=["job_id"])
        if state.get("running_job") and state.get("job_fps") is not None:
            fps.add_metric([state["running_job"]], state["job_fps"])
        yield fps
        gpu = GaugeMetricFamily("pose_gpu_memory_used_bytes", "GPU memory in use (NVML)", labels=["device"])
        for device in state.get("gpu_devices") or []:
            gpu.add_metric([str(device.get("index"))], device.get("memory_used") or 0)
        yield gpu


def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, value=float(value or 0))
