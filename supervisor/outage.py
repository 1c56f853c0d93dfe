"""The ledger going away (a PostgreSQL restart, a full disk): the supervisor keeps its worker loaded,
stops writing for the running job, keeps crash reports in memory, probes with a small write until
writes work again (a full disk still answers reads) and writes what it kept when the ledger is back."""
from __future__ import annotations

import time
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator, Optional, Union

from pose_common.ledger import LedgerUnavailable, SqlLedger

MAX_KEPT_REPORTS = 100
MAX_RETRY_DELAY_S = 30.0


@dataclass
class Outage:
    cause: LedgerUnavailable  # the latest: what the last probe said
    since: float
    next_try: float
    delay: float = 1.0

    @property
    def reason(self) -> str:
        return str(self.cause)

    @property
    def disk_full(self) -> bool:
        return self.cause.disk_full

    def refusal(self) -> str:
        """Why a new job is refused while it lasts."""
        if self.disk_full:
            return f"no room for new jobs: {self.reason}; they are accepted again once space is freed"
        return f"the job ledger is unavailable: {self.reason}"


def as_outage(cause: Union[LedgerUnavailable, str]) -> LedgerUnavailable:
    return cause if isinstance(cause, LedgerUnavailable) else LedgerUnavailable(cause)


class LedgerKeeper:
    def __init__(self, ledger: SqlLedger, log, on_lost: Callable[[str], None],
                 clock: Callable[[], float] = time.monotonic):
        self.ledger, self.log, self.on_lost, self.clock = ledger, log, on_lost, clock
        self.outage: Optional[Outage] = None
        self.unwritten_reports: deque = deque(maxlen=MAX_KEPT_REPORTS)

    @contextmanager
    def guard(self) -> Iterator[None]:
        try:
            yield
        except LedgerUnavailable as exc:
            self.lost(exc)

    def lost(self, cause: Union[LedgerUnavailable, str]) -> Outage:
        """`cause`: the exception itself where the caller has it (it tells a full disk apart).
        -> the outage it is part of."""
        if self.outage is not None:
            return self.outage
        now = self.clock()
        outage = self.outage = Outage(as_outage(cause), now, now + 1.0)
        self.log.error("ledger_unavailable", reason=outage.reason, disk_full=outage.disk_full)
        self.on_lost(outage.reason)
        return outage

    def try_again(self, now: float) -> None:
        """Probe (a write: see SqlLedger.ping) with backoff; when back, write the crash reports kept meanwhile."""
        outage = self.outage
        if outage is None or now < outage.next_try:
            return
        try:
            self.ledger.ping()
        except LedgerUnavailable as exc:
            outage.cause = exc
            outage.delay = min(MAX_RETRY_DELAY_S, outage.delay * 2)
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
            self.lost(exc)
