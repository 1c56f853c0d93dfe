"""The ledger going away (a PostgreSQL restart, a full disk): the supervisor keeps its worker loaded,
stops writing for the running job, keeps crash reports in memory, reconnects with backoff and
writes what it kept when the ledger is back."""
from __future__ import annotations

import time
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

from pose_common.ledger import LedgerUnavailable, SqlLedger

MAX_KEPT_REPORTS = 100
MAX_RETRY_DELAY_S = 30.0


@dataclass
class Outage:
    reason: str
    since: float
    next_try: float
    delay: float = 1.0


class LedgerKeeper:
    def __init__(self, ledger: SqlLedger, log, on_lost: Callable[[str], None]):
        self.ledger, self.log, self.on_lost = ledger, log, on_lost
        self.outage: Optional[Outage] = None
        self.unwritten_reports: deque = deque(maxlen=MAX_KEPT_REPORTS)

    @contextmanager
    def guard(self) -> Iterator[None]:
        try:
            yield
        except LedgerUnavailable as exc:
            self.lost(str(exc))

    def lost(self, reason: str) -> None:
        if self.outage is not None:
            return
        now = time.monotonic()
        self.outage = Outage(reason, now, now + 1.0)
        self.log.error("ledger_unavailable", reason=reason)
        self.on_lost(reason)

    def try_again(self, now: float) -> None:
        """Reconnect with backoff; when back, write the crash reports kept meanwhile."""
        outage = self.outage
        if outage is None or now < outage.next_try:
            return
        try:
            self.ledger.ping()
        except LedgerUnavailable as exc:
            outage.reason, outage.delay = str(exc), min(MAX_RETRY_DELAY_S, outage.delay * 2)
            outage.next_try = now + outage.delay
            return
        self.outage = None
        self.log.info("ledger_back", down_s=round(now - outage.since, 1))
        while self.unwritten_reports:
            self.record(self.unwritten_reports.popleft())

    def record(self, report: dict) -> None:
        """A crash report into the ledger; kept in memory while the ledger is away."""
        self.log.error("crash_report", **{k: v for k, v in report.items() if k not in ("stderr_tail", "gpu_memory")})
        if self.outage:
            self.unwritten_reports.append(report)
            return
        try:
            self.ledger.add_crash(report)
        except LedgerUnavailable as exc:
            self.unwritten_reports.append(report)
            self.lost(str(exc))
