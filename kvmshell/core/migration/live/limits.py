"""What bounds and watches a running job: the limits the model must know, the stall watchdog, and how
the job throttles once a strategy arms it."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Throttling:
    """How the job throttles once a strategy arms it: dirty-limit where QEMU and KVM allow it, else auto-converge."""

    dirty_limit: bool = False
    vcpus: int = 1
    said: tuple[str, str] | None = None          # (decision, reason), said at the start


@dataclass
class Watchdog:
    """Progress seen by the job: no bytes sent for ``timeout`` seconds means the destination or the
    link is stuck (QEMU itself waits for TCP, many minutes)."""

    timeout: float
    transferred: int = 0
    since: float = 0.0
    stalled: str | None = None                   # why, once it fired

    def stuck(self, transferred: int, now: float) -> bool:
        if transferred > self.transferred or self.since == 0.0:
            self.transferred, self.since = transferred, now
            return False
        return now - self.since >= self.timeout


@dataclass(frozen=True)
class Limits:
    """What the model must know of the source's settings once both sides are prepared."""

    downtime_s: float = 0.3
    bandwidth_cap: float | None = None           # QEMU never sends faster than max-bandwidth


__all__ = ["Limits", "Throttling", "Watchdog"]
