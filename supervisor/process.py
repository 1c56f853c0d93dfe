"""The OS boundary: spawning the worker and the probe, signalling them, reading what they left.

Children are started as fresh interpreters (fork+exec, never a bare fork: CUDA cannot survive one).
A kill remembers why it was sent, so the exit decoder can tell our SIGKILL from the OOM killer's."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import deque
from typing import Callable, Optional

import psutil

from pose_common.children import stop_process
from pose_common.runtime import RuntimeDir


class ChildProcess:
    """A started child and what we did to it. The Popen (or anything with its poll/send_signal/wait)
    and the clock are given, so the same logic runs under a fake clock and fake processes in tests."""

    def __init__(self, popen: subprocess.Popen, stderr_path: str, label: str,
                 clock: Callable[[], float] = time.monotonic):
        self.popen, self.stderr_path, self.label, self.clock = popen, stderr_path, label, clock
        self.kill_reason: Optional[str] = None
        self.signalled_at: Optional[float] = None
        self.abort_sent_at: Optional[float] = None
        self.kill_sent_at: Optional[float] = None  # the first SIGKILL: a process alive long after it is unkillable
        self.started = clock()
        self.pid = popen.pid

    @classmethod
    def start(cls, argv: list[str], stderr_path: str, label: str) -> "ChildProcess":
        with open(stderr_path, "wb") as err:
            popen = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=err, close_fds=True, env=_child_env())
        return cls(popen, stderr_path, label)

    def poll(self) -> Optional[int]:
        return self.popen.poll()

    def alive(self) -> bool:
        return self.popen.poll() is None

    def send(self, sig: int, reason: str) -> None:
        if self.kill_reason is None:
            self.kill_reason, self.signalled_at = reason, self.clock()
        if sig == signal.SIGKILL and self.kill_sent_at is None:
            self.kill_sent_at = self.clock()
        self.popen.send_signal(sig)  # nothing once it has been reaped; a pid already gone is no error

    def escalate(self, reason: str, grace_s: float) -> None:
        """A hang: SIGABRT first (faulthandler writes every thread's stack into stderr), SIGKILL
        once `grace_s` has passed. Call on every tick while the process lives."""
        if self.abort_sent_at is None:
            self.send(signal.SIGABRT, reason)
            self.abort_sent_at = self.clock()
        elif self.clock() - self.abort_sent_at > grace_s and self.alive():
            self.send(signal.SIGKILL, self.kill_reason or reason)

    @property
    def escalating(self) -> bool:
        return self.abort_sent_at is not None

    def kill_if_stuck(self, grace_s: float) -> None:
        """Asked to stop and still alive after `grace_s` (stuck in native code): SIGKILL."""
        if self.signalled_at is not None and self.clock() - self.signalled_at > grace_s and self.alive():
            self.send(signal.SIGKILL, self.kill_reason or "stop")

    def unkillable_for(self, now: float) -> float:
        """Seconds this process has outlived our SIGKILL (uninterruptible sleep in a driver); 0 before one."""
        return 0.0 if self.kill_sent_at is None or not self.alive() else max(0.0, now - self.kill_sent_at)

    def stop(self, reason: str, timeout_s: float) -> Optional[int]:
        if self.kill_reason is None:
            self.kill_reason, self.signalled_at = reason, self.clock()
        return stop_process(self.popen, timeout_s)

    def stderr_tail(self, lines: int) -> str:
        try:
            with open(self.stderr_path, "rb") as fh:
                fh.seek(0, os.SEEK_END)
                fh.seek(max(0, fh.tell() - 64 * 1024))
                tail = deque(fh.read().decode("utf-8", "replace").splitlines(), maxlen=lines)
            return "\n".join(tail)
        except OSError:
            return ""


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("PYTHONUNBUFFERED", "1")
    # mediapipe/TF-Lite and glog chatter would bury the useful part of the stderr tail
    env.setdefault("GLOG_minloglevel", "2")
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    return env


def spawn_worker(runtime: RuntimeDir, generation: int, rung: dict) -> ChildProcess:
    argv = [sys.executable, "-m", "gpu_worker", "--config", runtime.config, "--generation", str(generation),
            "--rung", json.dumps(rung), "--parent-pid", str(os.getpid())]
    return ChildProcess.start(argv, runtime.worker_stderr(generation), f"worker-{generation}")


def spawn_probe(runtime: RuntimeDir, rung: dict, tag: str) -> tuple[ChildProcess, str]:
    out = runtime.probe_report(tag)
    if os.path.exists(out):
        os.unlink(out)
    argv = [sys.executable, "-m", "gpu_worker.probe", "--config", runtime.config, "--rung", json.dumps(rung),
            "--out", out]
    return ChildProcess.start(argv, runtime.probe_stderr(tag), f"probe-{tag}"), out


def read_json(path: str) -> dict:
    try:
        with open(path) as fh:
            return json.load(fh)
    except (OSError, ValueError):
        return {}


def kill_stale_worker(pidfile: str) -> Optional[int]:
    """A worker left by a supervisor that died hard (it should have died with it; make sure)."""
    pid = read_json(pidfile).get("pid")
    if not isinstance(pid, int):
        return None
    try:
        proc = psutil.Process(pid)
        if "gpu_worker" in " ".join(proc.cmdline()):
            proc.kill()
            return pid
    except psutil.Error:
        pass
    return None


class Spawner:
    """Starts the worker and the probe with everything they read written fresh first, so nothing a
    child needs can have been pruned or cleaned away; prunes old generations' files afterwards."""

    def __init__(self, runtime: RuntimeDir, write_config: Callable[[str], None], keep_generations: int):
        self.runtime, self.write_config, self.keep = runtime, write_config, keep_generations

    def prepare(self) -> None:
        self.runtime.prepare()
        self.write_config(self.runtime.config)

    def worker(self, generation: int, rung: dict) -> ChildProcess:
        self.prepare()
        proc = spawn_worker(self.runtime, generation, rung)
        with open(self.runtime.worker_pidfile, "w") as fh:
            json.dump({"pid": proc.pid, "generation": generation}, fh)
        self.runtime.prune_generations(self.keep)
        return proc

    def probe(self, rung: dict, tag: str) -> tuple[ChildProcess, str]:
        self.prepare()
        return spawn_probe(self.runtime, rung, tag)

    def crumb(self, generation: int) -> dict:
        return read_json(self.runtime.worker_crumb(generation))
