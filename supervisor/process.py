"""The OS boundary: spawning the worker and the probe, signalling them, reading what they left.

Children are started as fresh interpreters (fork+exec, never a bare fork: CUDA cannot survive one)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import deque
from typing import Optional

import psutil

from pose_common.runtime import RuntimeDir


class ChildProcess:
    def __init__(self, argv: list[str], stderr_path: str, label: str):
        self.label, self.stderr_path = label, stderr_path
        self.kill_reason: Optional[str] = None
        self.abort_sent_at: Optional[float] = None
        self.started = time.monotonic()
        with open(stderr_path, "wb") as err:
            self.popen = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                          stderr=err, close_fds=True, env=_child_env())
        self.pid = self.popen.pid

    def poll(self) -> Optional[int]:
        return self.popen.poll()

    def alive(self) -> bool:
        return self.popen.poll() is None

    def send(self, sig: int, reason: str) -> None:
        if self.kill_reason is None:
            self.kill_reason = reason
        try:
            os.kill(self.pid, sig)
        except ProcessLookupError:
            pass

    def abort_then_kill(self, reason: str) -> None:
        """Hang: SIGABRT first so faulthandler writes every thread's stack into stderr."""
        self.send(signal.SIGABRT, reason)
        self.abort_sent_at = time.monotonic()

    def kill_if_abort_ignored(self, grace_s: float) -> None:
        if self.abort_sent_at is not None and time.monotonic() - self.abort_sent_at > grace_s and self.alive():
            self.send(signal.SIGKILL, self.kill_reason or "hang")

    def stop(self, reason: str, timeout_s: float) -> Optional[int]:
        self.send(signal.SIGTERM, reason)
        try:
            return self.popen.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.send(signal.SIGKILL, reason)
            return self.popen.wait(5)

    def rss(self) -> Optional[int]:
        try:
            return psutil.Process(self.pid).memory_info().rss
        except psutil.Error:
            return None

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
    return ChildProcess(argv, runtime.worker_stderr(generation), f"worker-{generation}")


def spawn_probe(runtime: RuntimeDir, rung: dict, tag: str) -> tuple[ChildProcess, str]:
    out = runtime.probe_report(tag)
    if os.path.exists(out):
        os.unlink(out)
    argv = [sys.executable, "-m", "gpu_worker.probe", "--config", runtime.config, "--rung", json.dumps(rung),
            "--out", out]
    return ChildProcess(argv, runtime.probe_stderr(tag), f"probe-{tag}"), out


def read_json(path: str) -> dict:
    try:
        with open(path) as fh:
            return json.load(fh)
    except (OSError, ValueError):
        return {}


def kill_stale_worker(pidfile: str) -> Optional[int]:
    """A worker left by a supervisor that died hard (it should have died with it; make sure)."""
    info = read_json(pidfile)
    pid = info.get("pid")
    if not pid:
        return None
    try:
        proc = psutil.Process(pid)
        if "gpu_worker" in " ".join(proc.cmdline()):
            proc.kill()
            return pid
    except psutil.Error:
        pass
    return None
