"""The runtime directory's layout, in one place: every process takes its paths from here.

Files written once per supervisor life (the worker config, the sockets, the pid file) have fixed
names; files written per worker generation are named `gen-<N>.<kind>`, and only those are pruned,
by an exact pattern and by generation number, so pruning can never remove a shared file."""
from __future__ import annotations

import os
import re
from dataclasses import dataclass

GENERATION_FILE = re.compile(r"^gen-(\d+)\.(stderr|crumb)$")
PRIVATE_DIR = 0o700


@dataclass(frozen=True)
class RuntimeDir:
    path: str

    def prepare(self) -> None:
        """Create it private (it holds the sockets); also repairs a dir someone removed."""
        os.makedirs(self.path, mode=PRIVATE_DIR, exist_ok=True)
        os.chmod(self.path, PRIVATE_DIR)

    def file(self, name: str) -> str:
        return os.path.join(self.path, name)

    @property
    def config(self) -> str:
        return self.file("config.yaml")

    @property
    def worker_pidfile(self) -> str:
        return self.file("worker.pid")

    @property
    def supervisor_socket(self) -> str:
        return self.file("supervisor.sock")

    @property
    def worker_socket(self) -> str:
        return self.file("worker.sock")

    @property
    def supervisor_tick(self) -> str:
        return self.file("supervisor.tick")

    @property
    def overlay_stderr(self) -> str:
        return self.file("overlay.stderr")

    def worker_stderr(self, generation: int) -> str:
        return self.file(f"gen-{generation}.stderr")

    def worker_crumb(self, generation: int) -> str:
        return self.file(f"gen-{generation}.crumb")

    def probe_report(self, tag: str) -> str:
        return self.file(f"probe-{tag}.json")

    def probe_stderr(self, tag: str) -> str:
        return self.file(f"probe-{tag}.stderr")

    def prune_generations(self, keep: int) -> int:
        """Remove the per-generation files of all but the newest `keep` generations. -> removed."""
        found = [(int(m.group(1)), entry.path) for entry in os.scandir(self.path)
                 if (m := GENERATION_FILE.match(entry.name))]
        newest = sorted({gen for gen, _ in found}, reverse=True)[:max(0, keep)]
        removed = 0
        for generation, path in found:
            if generation not in newest:
                try:
                    os.unlink(path)
                    removed += 1
                except OSError:
                    pass
        return removed
