"""`pose-service serve`: the main process under systemd. It runs the supervisor and the gateway as
two children and restarts either one that dies (with backoff), so killing the supervisor leaves the
gateway answering 503 and killing the gateway leaves jobs running. It alone talks to systemd.

It owns what must outlive its children: the state-dir lock (one serve per state dir), the HTTP
listening socket (handed to each gateway, so a restart never refuses a connection), and the
watchdog, which it feeds only while the supervisor's loop proves it is turning."""
from __future__ import annotations

import os
import queue
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from typing import Optional

from configs import Config
from pose_common import statelock
from pose_common.children import parent_death_signal, stop_process
from pose_common.logs import setup_logging
from pose_common.runtime import RuntimeDir
from pose_common.sdnotify import notify, watchdog_interval_s
from pose_service.listener import HANDOVER_ENV, listening_socket
from supervisor.policy import backoff_delay

HEALTHY_AFTER_S = 60.0     # a child that ran this long starts its backoff afresh when it dies
TICK_FRESH_MIN_S = 2.0     # the supervisor's loop counts as turning if it ticked this recently


class Child:
    def __init__(self, role: str, argv: list[str], listener: Optional[socket.socket] = None):
        self.role, self.argv, self.listener = role, argv, listener
        self.popen: Optional[subprocess.Popen] = None
        self.restarts = 0
        self.next_start = 0.0
        self.started = 0.0

    def start(self) -> None:
        env = dict(os.environ)
        fds: tuple[int, ...] = ()
        if self.listener is not None:
            env[HANDOVER_ENV], fds = str(self.listener.fileno()), (self.listener.fileno(),)
        self.popen = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, env=env, pass_fds=fds,
                                      preexec_fn=parent_death_signal(os.getpid()))
        self.started = time.monotonic()

    def exited(self) -> Optional[int]:
        return None if self.popen is None else self.popen.poll()

    def running(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def schedule_restart(self, now: float) -> float:
        if now - self.started > HEALTHY_AFTER_S:
            self.restarts = 0
        self.restarts += 1
        delay = backoff_delay(self.restarts, 0.25, 30.0)
        self.next_start = now + delay
        self.popen = None
        return delay

    def stop(self, timeout_s: float) -> None:
        if self.popen is not None:
            stop_process(self.popen, timeout_s)


class ServiceManager:
    def __init__(self, cfg: Config, overrides: list[str], config_name: str,
                 signal_queue: Optional[queue.SimpleQueue] = None):
        self.cfg = cfg
        self.log = setup_logging("service", cfg.log_level)
        self.lock = statelock.hold(os.path.join(cfg.state_dir, "serve.lock"), "pose-service serve")
        self.listener = listening_socket(cfg.gateway.host, cfg.gateway.port)
        self.tick_file = RuntimeDir(cfg.runtime_dir).supervisor_tick
        base = [sys.executable, "-m", "pose_service.cli", "--config-name", config_name]
        self.children = [Child("supervisor", [*base, "supervisor", *overrides]),
                         Child("gateway", [*base, "gateway", *overrides], self.listener)]
        self.signals = signal_queue or queue.SimpleQueue()
        self.running = True
        self.ready_sent = False
        self.watchdog_s = watchdog_interval_s()
        self.last_ping = 0.0

    def run(self) -> int:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda signum, _f: self.signals.put_nowait(signum))
        for child in self.children:
            child.start()
        while self.running:
            self.handle_signals()
            self.reap_children()
            self.start_due_children()
            self.announce_ready()
            self.feed_watchdog()
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

    def supervisor_turning(self) -> bool:
        try:
            age = time.time() - os.stat(self.tick_file).st_mtime
        except OSError:
            return False
        return age <= max(TICK_FRESH_MIN_S, self.watchdog_s)

    def feed_watchdog(self) -> None:
        now = time.monotonic()
        if not self.watchdog_s or now - self.last_ping < self.watchdog_s:
            return
        if self.supervisor_turning() and all(child.running() for child in self.children):
            notify("WATCHDOG=1")
            self.last_ping = now

    def announce_ready(self) -> None:
        if self.ready_sent or not all(child.running() for child in self.children):
            return
        host = "127.0.0.1" if self.cfg.gateway.host in ("0.0.0.0", "") else self.cfg.gateway.host
        url = f"http://{host}:{self.listener.getsockname()[1]}/v1/health"
        try:
            urllib.request.urlopen(url, timeout=1)
        except urllib.error.HTTPError:
            pass  # any JSON answer means the gateway and the supervisor socket are up
        except OSError:
            return
        notify("READY=1\nSTATUS=serving")
        self.ready_sent = True
        self.log.info("service_ready", url=url)


def main(cfg: Config, overrides: list[str], config_name: str) -> int:
    try:
        manager = ServiceManager(cfg, overrides, config_name)
    except statelock.StateDirHeld as exc:
        print(f"pose-service serve: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"pose-service serve: cannot listen on {cfg.gateway.host}:{cfg.gateway.port}: {exc.strerror}",
              file=sys.stderr)
        return 2
    return manager.run()
