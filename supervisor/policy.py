"""Restart policy as pure logic over (history of causes, clock): backoff, intensity, ladder."""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field


def backoff_delay(restarts: int, initial_s: float, max_s: float) -> float:
    """The first restart is immediate; each repeat waits twice as long, up to max_s."""
    if restarts <= 1:
        return 0.0
    return float(min(max_s, initial_s * 2 ** (restarts - 2)))


@dataclass(frozen=True)
class Decision:
    action: str          # "restart" | "step_down" | "fatal"
    delay_s: float
    reason: str


@dataclass
class RestartPolicy:
    backoff_initial_s: float = 0.5
    backoff_max_s: float = 30.0
    intensity: int = 3
    period_s: float = 60.0
    deaths: deque[tuple[float, str]] = field(default_factory=lambda: deque(maxlen=1000))
    consecutive: int = 0

    def record(self, at: float, kind: str, counts: bool) -> None:
        if counts:
            self.deaths.append((at, kind))
        self.consecutive += 1

    def recent(self, now: float) -> list[tuple[float, str]]:
        return [(t, k) for t, k in self.deaths if now - t <= self.period_s]

    def decide(self, now: float, kind: str, retry: bool, has_lower_rung: bool) -> Decision:
        """Call after record(). A load failure never loops; `intensity` deaths in `period_s`
        step down the ladder or stop."""
        if not retry:
            return self._give_up(f"{kind}: not retried", has_lower_rung)
        recent = self.recent(now)
        if len(recent) >= self.intensity:
            kinds = ", ".join(k for _, k in recent[-self.intensity:])
            return self._give_up(f"{len(recent)} deaths in {self.period_s:g}s ({kinds})", has_lower_rung)
        return Decision("restart", self.backoff(), f"{kind}: restart")

    def backoff(self) -> float:
        return backoff_delay(self.consecutive, self.backoff_initial_s, self.backoff_max_s)

    def _give_up(self, reason: str, has_lower_rung: bool) -> Decision:
        if has_lower_rung:
            return Decision("step_down", 0.0, reason)
        return Decision("fatal", 0.0, reason)

    def healthy(self) -> None:
        """A worker reached READY: later deaths start the backoff from scratch."""
        self.consecutive = 0

    def reset(self) -> None:
        self.deaths.clear()
        self.consecutive = 0


@dataclass
class Fatal:
    """The service gave up starting workers: why, since when, and whether a restart could fix it
    (a crash loop may clear; missing weights will not)."""
    reason: str
    since: float
    restart_can_fix: bool
    retries: int = 0
