"""What bounds and watches a running job: the limits the model must know, the stall watchdog, and how
the job throttles once a strategy arms it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from kvmshell.errors import CommandFailed

if TYPE_CHECKING:
    from kvmshell.core.migration.live.settings import Settings
    from kvmshell.core.monitor.base import Monitor


@dataclass
class Throttling:
    """How the job throttles once a strategy arms it: dirty-limit where QEMU and KVM allow it, else auto-converge."""

    dirty_limit: bool = False
    vcpus: int = 1
    said: tuple[str, str] | None = None          # (decision, reason), said at the start

    async def choose(self, settings: Settings, src: Monitor, caps: dict[str, bool]) -> None:
        """dirty-limit instead of auto-converge where the source's QEMU has the capability and KVM's
        dirty ring is on; QEMU itself says whether it is (it refuses the capability without it)."""
        if "dirty-limit" not in await src.migrate_capabilities():
            self.said = ("converge-with", "auto-converge: dirty-limit not used, this QEMU has no dirty-limit "
                                          "capability")
            return
        try:
            await settings.set_capabilities(src, {"auto-converge": False, "dirty-limit": True})
            self.vcpus = await src.vcpu_count()
        except CommandFailed as e:
            self.said = ("converge-with", f"auto-converge: dirty-limit not used, QEMU refused it ({e.message})")
            return
        caps |= {"auto-converge": False, "dirty-limit": True}
        self.dirty_limit = True
        self.said = ("converge-with", f"dirty-limit: this QEMU has it and KVM's dirty ring is on; it holds back "
                                      f"each of the {self.vcpus} vCPUs that dirties too fast, where auto-converge "
                                      f"would slow every vCPU")

    def dirty_limit_mb(self, rate: float) -> int:
        """vcpu-dirty-limit (MB/s per vCPU) so that all vCPUs together dirty about half of ``rate``."""
        return max(1, int(0.5 * rate / self.vcpus / 2**20))


MIRROR_STEP = 16 << 20       # a mirror job's progress moves in steps of its buffer (QEMU's default buf-size)
SETUP_TIMEOUT = 60.0         # seconds a migration may stay in its setup (libvirt starting the destination's QEMU)


@dataclass
class Watchdog:
    """Progress seen by the job: no bytes sent for ``timeout`` seconds means the destination or the
    link is stuck (QEMU itself waits for TCP, many minutes). A disk copy inside the migration
    (libvirt's --copy-storage copies the disks before the RAM) counts as progress when its remaining
    bytes shrink; it moves in mirror-buffer steps, so at ``bandwidth`` (bytes/s) the watchdog waits two
    steps at least while it runs.

    The stall clock starts once the job leaves its setup: in setup nothing moves by design (QEMU
    connects; libvirt prepares the destination, starting its QEMU, which takes seconds on a loaded
    host). Setup has its own, longer limit, ``setup_timeout``."""

    timeout: float
    bandwidth: int | None = None
    setup_timeout: float = SETUP_TIMEOUT
    setup_since: float | None = None             # when `migrate` was sent (else: first seen in setup)
    transferred: int = 0
    since: float = 0.0
    stalled: str | None = None                   # why, once it fired
    disk_remaining: int | None = None            # the least seen

    def setup_overdue(self, now: float) -> bool:
        """The job is still in its setup at ``now``: the stall clock waits for it to end; True once the
        setup has lasted ``setup_timeout``."""
        if self.setup_since is None:
            self.setup_since = now
        self.since = 0.0                         # the stall clock starts at the first sample after setup
        return now - self.setup_since >= self.setup_timeout

    def stuck(self, transferred: int, now: float, disk_remaining: int | None = None) -> bool:
        """No bytes sent, and no disk copy getting closer to its end, for the timeout."""
        disk_moved = disk_remaining is not None and (self.disk_remaining is None or disk_remaining < self.disk_remaining)
        if disk_moved:
            self.disk_remaining = disk_remaining
        if transferred > self.transferred or disk_moved or self.since == 0.0:
            self.transferred, self.since = max(transferred, self.transferred), now
            return False
        timeout = self.timeout
        if disk_remaining and self.bandwidth:
            timeout = max(timeout, 2 * MIRROR_STEP / self.bandwidth)
        return now - self.since >= timeout


@dataclass(frozen=True)
class Limits:
    """What the model must know of the source's settings once both sides are prepared."""

    downtime_s: float = 0.3
    bandwidth_cap: float | None = None           # QEMU never sends faster than max-bandwidth


__all__ = ["MIRROR_STEP", "SETUP_TIMEOUT", "Limits", "Throttling", "Watchdog"]
