"""What the request handlers and the views may use of the supervisor: its parts, by type.

The arbiter owns the loop; these are the parts a request or a view reads or asks something of.
Typed as a Protocol so that neither module reaches into the arbiter's other attributes, and so
that mypy checks every use (the arbiter satisfies it structurally)."""
from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING, Any, Callable, Optional, Protocol

if TYPE_CHECKING:  # the parts' own modules import nothing from here; annotations only
    from configs import Config
    from pose_common import protocol as P
    from pose_common.ledger import SqlLedger
    from supervisor.jobs import JobRunner, PendingImages
    from supervisor.metrics import Metrics
    from supervisor.outage import LedgerKeeper
    from supervisor.retention import Retention
    from supervisor.slot import WorkerSlot


class SupervisorParts(Protocol):
    cfg: Config
    ledger: SqlLedger
    keeper: LedgerKeeper
    slot: WorkerSlot
    jobs: JobRunner
    images: PendingImages
    retention: Retention
    metrics: Metrics
    dropped: Counter
    started_at: float
    crash_next_tick: bool
    log: Any  # structlog's bound logger
    clock: Callable[[], float]  # monotonic seconds (a fake one in the model check)

    def reply(self, identity: bytes, request: P.Envelope, status: int = 200, /, **body: Any) -> None: ...

    def send_worker(self, kind: str, job: Optional[str] = None, blobs: Optional[list] = None,
                    req: Optional[str] = None, **body: Any) -> bool: ...
