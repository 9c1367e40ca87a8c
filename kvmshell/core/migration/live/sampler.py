"""A sampler per migrating guest: query-migrate at an interval plus QEMU's migration events.

Samples go into a ring buffer, to subscribers, and to a trace file if asked. An event (MIGRATION,
MIGRATION_PASS) wakes the sampler at once, so a status change is seen without waiting for the next
tick. Every query is bounded: during stop-and-copy QEMU answers late (the guest is paused while the
last pages go), and a slow answer only costs a sample.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from kvmshell.core.migration.model.samples import Sample, SampleRing, TraceEvent, TraceWriter
from kvmshell.core.values.models import Event, MigrationStatus
from kvmshell.core.monitor.base import Monitor
from kvmshell.errors import Disconnected, KvmError, MonitorTimeout

log = logging.getLogger(__name__)

THROUGHPUT_WINDOW_S = 0.3      # throughput is measured over at least this long
WATCHED_EVENTS = ("MIGRATION", "MIGRATION_PASS", "STOP", "RESUME", "SHUTDOWN", "kvmshell.DISCONNECTED")


class Sampler:
    def __init__(self, monitor: Monitor, *, interval: float = 0.5, ring: SampleRing | None = None,
                 trace: TraceWriter | None = None, clock: Callable[[], float] = time.monotonic,
                 query_timeout: float = 2.0) -> None:
        self.monitor = monitor
        self.interval = interval
        self.ring = ring or SampleRing()
        self.trace = trace
        self.clock = clock
        self.query_timeout = query_timeout
        self.start = clock()
        self.events: list[TraceEvent] = []
        self._wake = asyncio.Event()
        self._sample_listeners: list[Callable[[Sample], None]] = []
        self._event_listeners: list[Callable[[TraceEvent], None]] = []
        self.lost: str | None = None            # why the source monitor went away, if it did

    @property
    def now(self) -> float:
        return self.clock() - self.start

    def on_sample(self, cb: Callable[[Sample], None]) -> None:
        self._sample_listeners.append(cb)

    def on_event(self, cb: Callable[[TraceEvent], None]) -> None:
        self._event_listeners.append(cb)

    def wake(self) -> None:
        """Take the next sample now rather than at the next tick."""
        self._wake.set()

    def record(self, event: TraceEvent) -> None:
        """Keep an event (QEMU's or a kvmshell decision) in the trace and tell the listeners."""
        self.events.append(event)
        if self.trace is not None:
            self.trace.write(event)
        for cb in list(self._event_listeners):
            cb(event)

    def _qemu_event(self, ev: Event) -> None:
        if ev.name not in WATCHED_EVENTS:
            return
        if ev.name == "kvmshell.DISCONNECTED":
            self.lost = str(ev.data.get("reason", "monitor lost"))
        self.record(TraceEvent(self.now, "qemu" if not ev.name.startswith("kvmshell.") else "kvmshell",
                               ev.name, dict(ev.data)))
        self._wake.set()

    async def sample(self) -> Sample | None:
        """Take one sample now (None if QEMU did not answer in time)."""
        try:                # asyncio.timeout, not wait_for: 3.11's wait_for can swallow a cancel (gh-86296)
            async with asyncio.timeout(self.query_timeout):
                info = await self.monitor.migration()
        except (TimeoutError, MonitorTimeout):
            return None
        now = self.now
        s = Sample.from_info(info, now, self.ring.last, self.ring.at_least(THROUGHPUT_WINDOW_S, now))
        self.ring.append(s)
        if self.trace is not None:
            self.trace.write(s)
        for cb in list(self._sample_listeners):
            cb(s)
        return s

    async def _settled(self, s: Sample) -> Sample:
        """QEMU may report `completed` a moment before it fills in total-time and downtime."""
        for _ in range(10):
            if s.status is not MigrationStatus.COMPLETED or s.total_time_ms:
                return s
            await asyncio.sleep(0.02)
            s = await self.sample() or s
        return s

    async def run(self) -> Sample | None:
        """Sample until the migration finishes (or the monitor is lost); the last sample."""
        unsubscribe = self.monitor.subscribe(self._qemu_event)
        last: Sample | None = None
        try:
            while True:
                self._wake.clear()
                try:
                    s = await self.sample()
                except (Disconnected, KvmError) as e:
                    self.lost = self.lost or str(e)
                    return last
                if s is not None:
                    last = s
                    if MigrationStatus(s.status).is_finished:
                        return await self._settled(s)
                    if s.status is MigrationStatus.NONE and len(self.ring) > 1:
                        return s
                try:
                    async with asyncio.timeout(self.interval):
                        await self._wake.wait()
                except TimeoutError:
                    pass
        finally:
            unsubscribe()
