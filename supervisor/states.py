"""The worker lifecycle: one explicit state machine, in one place.

PROBING -> SPAWNING -> LOADING(stage) -> READY <-> BUSY -> DRAINING -> EXITED, plus BACKOFF and
FATAL. The probe runs before the worker is spawned, so the worker never tries a detector
configuration that has not survived once in a throw-away process."""
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
    S.BACKOFF: frozenset({S.PROBING, S.SPAWNING, S.FATAL, S.DRAINING, S.EXITED}),
    S.PROBING: frozenset({S.SPAWNING, S.EXITED, S.DRAINING}),
    S.SPAWNING: frozenset({S.LOADING, S.EXITED, S.DRAINING}),
    S.LOADING: frozenset({S.LOADING, S.READY, S.EXITED, S.DRAINING}),
    S.READY: frozenset({S.BUSY, S.EXITED, S.DRAINING}),
    S.BUSY: frozenset({S.READY, S.EXITED, S.DRAINING}),
    S.DRAINING: frozenset({S.EXITED}),
    S.FATAL: frozenset({S.PROBING, S.SPAWNING, S.DRAINING, S.EXITED}),
}


class IllegalTransition(RuntimeError):
    pass


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
    since: float = field(default_factory=time.monotonic)
    history: deque = field(default_factory=lambda: deque(maxlen=200))

    def move(self, dst: WorkerState, reason: str = "", stage: Optional[str] = None) -> Transition:
        if dst not in ALLOWED[self.state]:
            raise IllegalTransition(f"{self.state.value} -> {dst.value} ({reason})")
        record = Transition(time.time(), self.generation, self.state.value, dst.value, stage, reason)
        self.state, self.stage, self.since = dst, stage, time.monotonic()
        self.history.append(record)
        return record

    def in_(self, *states: WorkerState) -> bool:
        return self.state in states

    @property
    def alive(self) -> bool:
        return self.state in (S.SPAWNING, S.LOADING, S.READY, S.BUSY, S.DRAINING)

    def label(self) -> str:
        return f"{self.state.value}({self.stage})" if self.state is S.LOADING and self.stage else self.state.value
