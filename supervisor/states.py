"""The worker lifecycle: one explicit state machine, in one place.

EXITED -> PROBING -> SPAWNING -> LOADING(stage) -> READY <-> BUSY -> DRAINING -> EXITED, plus
BACKOFF and FATAL. The probe runs before the worker is spawned, so the worker never tries a
detector configuration that has not survived once in a throw-away process."""
from __future__ import annotations

import enum
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Optional


class WorkerState(str, enum.Enum):
    PROBING = "probing"
    SPAWNING = "spawning"
    LOADING = "loading"
    READY = "ready"
    BUSY = "busy"
    DRAINING = "draining"
    EXITED = "exited"
    BACKOFF = "backoff"
    FATAL = "fatal"


S = WorkerState
ALLOWED: dict[WorkerState, frozenset[WorkerState]] = {
    S.EXITED: frozenset({S.PROBING, S.SPAWNING, S.BACKOFF, S.FATAL}),
    S.BACKOFF: frozenset({S.EXITED, S.FATAL}),
    S.PROBING: frozenset({S.SPAWNING, S.EXITED, S.DRAINING}),
    S.SPAWNING: frozenset({S.LOADING, S.EXITED, S.DRAINING}),
    S.LOADING: frozenset({S.LOADING, S.READY, S.EXITED, S.DRAINING}),
    S.READY: frozenset({S.BUSY, S.EXITED, S.DRAINING}),
    S.BUSY: frozenset({S.READY, S.EXITED, S.DRAINING}),
    S.DRAINING: frozenset({S.EXITED}),
    S.FATAL: frozenset({S.EXITED}),
}
WORKER_ALIVE = frozenset({S.SPAWNING, S.LOADING, S.READY, S.BUSY, S.DRAINING})


class IllegalTransition(RuntimeError):
    """A bug in the supervisor: messages that do not fit the state are filtered before moving."""


@dataclass
class Transition:
    at: float
    generation: int
    src: str
    dst: str
    stage: Optional[str]
    reason: str


@dataclass
class WorkerLifecycle:
    state: WorkerState = WorkerState.EXITED
    stage: Optional[str] = None
    device: str = "cpu"
    generation: int = 0
    history: deque[Transition] = field(default_factory=lambda: deque(maxlen=200))

    def can_move(self, dst: WorkerState) -> bool:
        return dst in ALLOWED[self.state]

    def move(self, dst: WorkerState, reason: str = "", stage: Optional[str] = None) -> Transition:
        if not self.can_move(dst):
            raise IllegalTransition(f"{self.state.value} -> {dst.value} ({reason})")
        record = Transition(time.time(), self.generation, self.state.value, dst.value, stage, reason)
        self.state, self.stage = dst, stage
        self.history.append(record)
        return record

    def label(self) -> str:
        return f"{self.state.value}({self.stage})" if self.state is S.LOADING and self.stage else self.state.value
