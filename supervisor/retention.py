"""Bounded disk: finished jobs' files (their upload, result, overlay, pickle) are removed after a
configurable age, and oldest first while their total size is over a configurable limit. The ledger
keeps a tombstone, so a removed job answers 410 with the reason instead of 404. Videos that were
given by path belong to the user and are never touched."""
from __future__ import annotations

import glob
import os
import time
from typing import Callable, Optional

from pose_common.ledger import Job, SqlLedger


def job_files(job: Job, results_dir: str) -> list[str]:
    files = glob.glob(os.path.join(results_dir, f"{job.job_id}.*"))
    if job.source == "upload":
        files.append(job.video_path)
    return [f for f in files if os.path.isfile(f)]


def size_of(paths: list[str]) -> int:
    total = 0
    for path in paths:
        try:
            total += os.path.getsize(path)
        except OSError:
            pass
    return total


class Retention:
    def __init__(self, ledger: SqlLedger, results_dir: str, keep_s: float, max_bytes: int, every_s: float, log,
                 clock: Callable[[], float] = time.time):
        self.ledger, self.results_dir, self.log, self.clock = ledger, results_dir, log, clock
        self.keep_s, self.max_bytes, self.every_s = keep_s, max_bytes, every_s
        self.last_sweep: Optional[float] = None

    def maybe_sweep(self) -> int:
        now = self.clock()
        if not self.every_s or (self.last_sweep is not None and now - self.last_sweep < self.every_s):
            return 0
        self.last_sweep = now
        return self.sweep(now)

    def sweep(self, now: float) -> int:
        """-> the number of jobs removed."""
        jobs = self.ledger.finished_jobs()  # oldest first
        sized = [(job, job_files(job, self.results_dir)) for job in jobs]
        total = sum(size_of(files) for _, files in sized)
        removed = 0
        for job, files in sized:
            too_old = self.keep_s and job.finished_at is not None and now - job.finished_at > self.keep_s
            too_big = self.max_bytes and total > self.max_bytes
            if not (too_old or too_big):
                continue
            reason = (f"removed after {self.keep_s / 86400:g} days (jobs.keep_finished_s)" if too_old else
                      f"removed to keep finished jobs under {self.max_bytes >> 20} MB (jobs.keep_max_mb)")
            total -= self.remove(job, files, reason)
            removed += 1
        return removed

    def delete(self, job_id: str, reason: str) -> None:
        """Remove one job's files and data now (a client's DELETE), leaving the tombstone."""
        job = self.ledger.job(job_id)
        if job is not None and not job.removed_at:
            self.remove(job, job_files(job, self.results_dir), reason)

    def remove(self, job: Job, files: list[str], reason: str) -> int:
        freed = size_of(files)
        for path in files:
            try:
                os.unlink(path)
            except OSError:
                pass
        self.ledger.mark_removed(job.job_id, reason)
        self.log.info("job_removed", job_id=job.job_id, reason=reason, freed_bytes=freed)
        return freed
