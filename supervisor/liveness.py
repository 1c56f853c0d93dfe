"""How long the worker could actually run, read from the OS, so that load is never mistaken for a hang.

Wall time lies on a busy machine: a worker that waits for a CPU behind other processes makes no
progress through no fault of its own. Linux counts, per thread, the time spent runnable but waiting
on a run queue (`/proc/<pid>/task/<tid>/schedstat`, second field). The worker's *run time* is wall
time less its threads' waits over the same interval (summed, at most the interval: a frame's work
spread over a thread pool is held up whenever any of its threads waits); on an idle host the two
are equal. Its CPU time (first field, summed) tells "computing in native code that holds the GIL, so
the heartbeat thread cannot beat" from "asleep in a deadlock"."""
from __future__ import annotations

import os
import statistics
from collections import deque
from dataclasses import dataclass
from typing import Callable, Optional

NS = 1e-9
MAX_THREADS = 256


@dataclass(frozen=True)
class SchedSample:
    cpu_s: float                  # on-CPU time, all threads together
    waits: dict[int, float]       # per thread: seconds spent waiting for a CPU so far


@dataclass(frozen=True)
class Mark:
    """A moment in the worker's life: its run time and CPU time then."""
    run_s: float
    cpu_s: float


SchedReader = Callable[[int], Optional[SchedSample]]


def read_schedstat(pid: int) -> Optional[SchedSample]:
    """-> None when the process is gone or the kernel keeps no schedstat (then run time = wall time)."""
    task_dir = f"/proc/{pid}/task"
    try:
        tids = os.listdir(task_dir)[:MAX_THREADS]
    except OSError:
        return None
    cpu, waits = 0.0, {}
    for tid in tids:
        try:
            with open(f"{task_dir}/{tid}/schedstat", "rb") as fh:
                on_cpu, waited = fh.read().split()[:2]
        except (OSError, ValueError):
            continue  # a thread that ended between the listing and the read
        cpu += int(on_cpu) * NS
        waits[int(tid)] = int(waited) * NS
    return SchedSample(cpu, waits) if waits else None


class RunClock:
    """The worker's run time and CPU time, sampled at most every `every_s` and extrapolated at wall
    rate between samples (so a worker is never given more time than the wall clock allows)."""

    def __init__(self, reader: SchedReader = read_schedstat, every_s: float = 0.5):
        self.reader, self.every_s = reader, every_s
        self.pid: Optional[int] = None
        self.sampled_at = 0.0
        self.run_s = self.cpu_s = 0.0
        self.last: Optional[SchedSample] = None

    def attach(self, pid: Optional[int], now: float) -> None:
        self.pid, self.sampled_at, self.run_s, self.cpu_s = pid, now, 0.0, 0.0
        self.last = self.reader(pid) if pid is not None else None

    def mark(self, now: float) -> Mark:
        if now - self.sampled_at >= self.every_s:
            self.sample(now)
        return Mark(self.run_s + max(0.0, now - self.sampled_at), self.cpu_s)

    def sample(self, now: float) -> None:
        wall = max(0.0, now - self.sampled_at)
        current = self.reader(self.pid) if self.pid is not None else None
        waited = new_waits(self.last, current)
        self.run_s += max(0.0, wall - min(wall, waited))
        if current is not None and self.last is not None:
            self.cpu_s += max(0.0, current.cpu_s - self.last.cpu_s)
        self.last, self.sampled_at = current if current is not None else self.last, now


def new_waits(before: Optional[SchedSample], after: Optional[SchedSample]) -> float:
    if before is None or after is None:
        return 0.0
    return sum(max(0.0, wait - before.waits.get(tid, 0.0)) for tid, wait in after.waits.items())


def silent_but_computing(silent_s: float, cpu_s: float, busy_fraction: float) -> bool:
    """No heartbeat, yet the process used the CPU for most of that time: native code holding the
    GIL (a big image conversion, a long kernel launch), not a deadlock."""
    return silent_s > 0 and cpu_s >= busy_fraction * silent_s


class FramePace:
    """Progress deadline for frames: long for a job's first frames, then max(floor, factor x the
    median recent per-frame time), so a hang on a warm 40 ms/frame worker shows in seconds while
    a slow GPU frame is never mistaken for one."""

    def __init__(self, first_s: float, warmup: int, floor_s: float, factor: float):
        self.first_s, self.warmup, self.floor_s, self.factor = first_s, warmup, floor_s, factor
        self.intervals: deque[float] = deque(maxlen=20)
        self.frames = 0
        self.last_at: Optional[float] = None

    def restart(self, now: float) -> None:
        self.frames, self.last_at = 0, now
        self.intervals.clear()

    def frame(self, now: float) -> None:
        if self.last_at is not None and self.frames:
            self.intervals.append(now - self.last_at)
        self.frames += 1
        self.last_at = now

    def limit_s(self) -> float:
        if self.frames < self.warmup or not self.intervals:
            return self.first_s
        return float(max(self.floor_s, self.factor * statistics.median(self.intervals)))
