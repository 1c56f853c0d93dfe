"""`pose-service serve`: the main process under systemd. It runs the supervisor and the gateway as
two children and restarts either one that dies (with backoff), so killing the supervisor leaves the
gateway answering 503 and killing the gateway leaves jobs running. It alone talks to systemd."""
from __future__ import annotations

import queue
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from typing import Optional

from pose_common.logs import setup_logging
from pose_common.sdnotify import notify, watchdog_interval_s


class Child:
    def __init__(self, role: str, overrides: list[str], config_name: str):
        self.role, self.overrides, self.config_name = role, overrides, config_name
        self.popen: Optional[subprocess.Popen] = None
        self.restarts = 0
        self.next_start = 0.0
        self.started = 0.0

    def start(self) -> None:
        argv = [sys.executable, "-m", "pose_service.cli", "--config-name", self.config_name, self.role,
                *self.overrides]
        self.popen = subprocess.Popen(argv, stdin=subprocess.DEVNULL)
        self.started = time.monotonic()

    def exited(self) -> Optional[int]:
        return None if self.popen is None else self.popen.poll()

    def schedule_restart(self, now: float) -> float:
        if now - self.started > 60:
            self.restarts = 0  # it had been healthy: start the backoff afresh
        self.restarts += 1
        delay = min(30.0, 0.25 * 2 ** min(self.restarts - 1, 7))
        self.next_start = now + delay
        self.popen = None
        return delay

    def stop(self, timeout_s: float) -> None:
        if self.popen is None or self.popen.poll() is not None:
            return
        self.popen.send_signal(signal.SIGTERM)
        try:
            self.popen.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait(5)


class ServiceManager:
    def __init__(self, cfg, overrides: list[str], config_name: str,
                 signal_queue: Optional[queue.SimpleQueue] = None):
        self.cfg = cfg
        self.log = setup_logging("service", cfg.log_level)
        self.children = [Child("supervisor", overrides, config_name), Child("gateway", overrides, config_name)]
        self.signals = signal_queue or queue.SimpleQueue()
        self.running = True
        self.ready_sent = False

    def run(self) -> int:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda signum, _f: self.signals.put_nowait(signum))
        for child in self.children:
            child.start()
        watchdog = watchdog_interval_s()
        last_ping = 0.0
        while self.running:
            self.handle_signals()
            self.reap_children()
            self.start_due_children()
            self.announce_ready()
            now = time.monotonic()
            if watchdog and now - last_ping >= watchdog and self.all_running():
                notify("WATCHDOG=1")
                last_ping = now
            time.sleep(0.2)
        notify("STOPPING=1")
        for child in reversed(self.children):
            child.stop(30.0)
        return 0

    def handle_signals(self) -> None:
        while not self.signals.empty():
            self.log.info("signal", signal=signal.Signals(self.signals.get_nowait()).name)
            self.running = False

    def reap_children(self) -> None:
        now = time.monotonic()
        for child in self.children:
            code = child.exited()
            if code is not None:
                delay = child.schedule_restart(now)
                self.log.error("child_exited", role=child.role, code=code, restart_in_s=delay)
                notify(f"STATUS={child.role} exited ({code}), restarting")

    def start_due_children(self) -> None:
        now = time.monotonic()
        for child in self.children:
            if child.popen is None and now >= child.next_start:
                child.start()

    def all_running(self) -> bool:
        return all(c.popen is not None and c.popen.poll() is None for c in self.children)

    def announce_ready(self) -> None:
        if self.ready_sent or not self.all_running():
            return
        url = f"http://{self.cfg.gateway.host}:{self.cfg.gateway.port}/v1/health"
        try:
            urllib.request.urlopen(url, timeout=1)
        except urllib.error.HTTPError:
            pass  # any JSON answer means the gateway and the supervisor socket are up
        except OSError:
            return
        notify("READY=1\nSTATUS=serving")
        self.ready_sent = True
        self.log.info("service_ready", url=url)
