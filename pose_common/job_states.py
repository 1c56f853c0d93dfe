"""A job's life in one table, as supervisor/states.py is the worker's.

    (accepted) -> QUEUED -> RUNNING -> RENDERING -> DONE
                    ^  |       |  \\______________/^
                    |__|_______|  (release, requeue)
                  any live state -> ERROR (failed, cancelled, given up)

Every ledger write that changes a job's state names one of the moves below; the ledger builds its
SQL from the move (the state it writes and the states it may write over), so a state change the
table does not allow cannot be written. What the states mean outside (the native API's
status/phase, the legacy routes' words, what the overlay reads) is derived here too."""
from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Optional


class JobState(str, enum.Enum):
    QUEUED = "queued"          # accepted, waiting for a worker (or put back after a stop or death)
    RUNNING = "running"        # leased to a supervisor; its worker stores the frames
    RENDERING = "rendering"    # every frame stored; the result file and the overlay are written
    DONE = "done"              # every artifact the answer names exists
    ERROR = "error"            # failed, cancelled ("cancelled") or given up; the reason is stored


J = JobState


class Move(str, enum.Enum):
    """The ledger's verbs that change a job's state."""
    ACCEPT = "accept"                      # a new row
    CLAIM = "claim"                        # a supervisor takes it (or takes over an expired lease)
    RELEASE = "release"                    # the worker stopped or died under it: back to the queue
    REQUEUE_ON_BOOT = "requeue_on_boot"    # one machine's supervisor restarted: what it ran is free
    MARK_RENDERING = "mark_rendering"      # every frame stored
    TAKE_OVER_RENDERING = "take_over_rendering"  # another supervisor finishes the artifacts
    FINISH = "finish"
    FAIL = "fail"                          # a worker's verdict, a cancel, a fatal service, given up


@dataclass(frozen=True)
class Rule:
    sources: frozenset[JobState]   # empty: the move creates the job
    target: JobState


MOVES: dict[Move, Rule] = {
    Move.ACCEPT: Rule(frozenset(), J.QUEUED),
    Move.CLAIM: Rule(frozenset({J.QUEUED, J.RUNNING}), J.RUNNING),
    Move.RELEASE: Rule(frozenset({J.RUNNING}), J.QUEUED),
    Move.REQUEUE_ON_BOOT: Rule(frozenset({J.RUNNING}), J.QUEUED),
    Move.MARK_RENDERING: Rule(frozenset({J.RUNNING}), J.RENDERING),
    Move.TAKE_OVER_RENDERING: Rule(frozenset({J.RENDERING}), J.RENDERING),
    Move.FINISH: Rule(frozenset({J.RUNNING, J.RENDERING}), J.DONE),
    Move.FAIL: Rule(frozenset({J.QUEUED, J.RUNNING, J.RENDERING}), J.ERROR),
}

TERMINAL = frozenset({J.DONE, J.ERROR})
IN_QUEUE = frozenset({J.QUEUED, J.RUNNING})      # waiting for or on a worker (queue positions count these)
LEASED = frozenset({J.RUNNING, J.RENDERING})     # a supervisor holds it and renews its lease
INFERRED = frozenset({J.RENDERING, J.DONE})      # every frame the job will have is stored


class IllegalJobMove(RuntimeError):
    """A bug: a write tried to move a job in a way the table does not allow."""


def edges() -> frozenset[tuple[Optional[JobState], JobState]]:
    """Every (from, to) pair the table allows; None is 'not yet accepted'."""
    pairs: set[tuple[Optional[JobState], JobState]] = set()
    for rule in MOVES.values():
        pairs.update((src, rule.target) for src in rule.sources or (None,))
    return frozenset(pairs)


def check(src: Optional[str], dst: str) -> None:
    """Raise unless the table allows src -> dst (a state left as it was is always allowed)."""
    if src == dst:
        return
    if (None if src is None else JobState(src), JobState(dst)) not in edges():
        raise IllegalJobMove(f"{src} -> {dst}")


def target_sql(move: Move) -> str:
    """`state='running'`: the SET part of a move's UPDATE."""
    return f"state='{MOVES[move].target.value}'"


def sources_sql(move: Move) -> str:
    """`state IN ('queued','running')`: the WHERE part that only lets the table's moves through."""
    sources = MOVES[move].sources
    if not sources:
        raise IllegalJobMove(f"{move.value} creates a job; it has no source state")
    return in_sql(sources)


def in_sql(states: frozenset[JobState]) -> str:
    if not states:
        raise ValueError("no job state to select")
    return f"state IN ({', '.join(repr(s.value) for s in sorted(states, key=order))})"


def order(state: JobState) -> int:
    return list(JobState).index(state)


def is_terminal(state: Optional[str]) -> bool:
    return state in {s.value for s in TERMINAL}


# --- what the states mean outside --------------------------------------------------------------------
@dataclass(frozen=True)
class Shown:
    status: str              # the native API's `status` (a client needs no more than these four)
    phase: Optional[str]     # what a running job is doing, where that matters
    legacy: str              # the word the legacy routes (the app's backend) read


SHOWN: dict[JobState, Shown] = {
    J.QUEUED: Shown("queued", None, "queued"),
    J.RUNNING: Shown("running", None, "processing"),
    J.RENDERING: Shown("running", "rendering", "processing"),
    J.DONE: Shown("done", None, "complete"),
    J.ERROR: Shown("error", None, "error"),
}
STATUSES = tuple(dict.fromkeys(shown.status for shown in SHOWN.values()))
LEGACY_WORDS = {state.value: shown.legacy for state, shown in SHOWN.items()}
# A refused upload on the legacy async route is shown as a job that failed at once
REFUSED = SHOWN[J.ERROR]


def shown(state: str) -> Shown:
    return SHOWN[JobState(state)]


def states_shown_as(word: str) -> frozenset[JobState]:
    """The states a `state=` filter means: a status (running includes rendering) or a state's own name."""
    by_status = frozenset(s for s, how in SHOWN.items() if how.status == word)
    return by_status or frozenset(s for s in JobState if s.value == word)


FILTER_WORDS = tuple(s.value for s in JobState)
