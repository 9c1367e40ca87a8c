"""Live data about each guest that completion and the toolbars read without waiting.

Refreshed in the background (tasks owned here) and swapped in with one assignment; invalidated by
the commands that change it (savevm -> tags, migrate_set_parameter -> parameters) and by events.
Readers never await: they get what is cached, possibly nothing yet.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

from kvmshell.core.monitor.fleet import Fleet
from kvmshell.core.values.models import (
    Capabilities, DirtyRate, MigrationInfo, MigrationParameters, Snapshot, Status,
)
from kvmshell.errors import KvmError

log = logging.getLogger(__name__)

SNAPSHOTS, PARAMETERS, CAPABILITIES, STATUS, MIGRATION = "snapshots", "parameters", "capabilities", "status", "migration"
ALL = (SNAPSHOTS, PARAMETERS, CAPABILITIES, STATUS, MIGRATION)
MEMORY = "memory"              # the guest's RAM size: fetched only when asked for (it does not change)


@dataclass(frozen=True)
class GuestSnapshot:
    """Everything cached about one guest, as of ``when``."""

    status: Status | None = None
    migration: MigrationInfo | None = None
    snapshots: tuple[Snapshot, ...] | None = None
    parameters: MigrationParameters | None = None
    capabilities: Capabilities | None = None
    when: float = 0.0
    ram_bytes: int | None = None


class GuestData:
    def __init__(self, fleet: Fleet) -> None:
        self.fleet = fleet
        self._data: dict[str, GuestSnapshot] = {}
        self._tasks: dict[tuple[str, str], asyncio.Task[None]] = {}
        self._dirty: dict[str, DirtyRate] = {}

    def get(self, name: str) -> GuestSnapshot:
        return self._data.get(name, GuestSnapshot())

    def tags(self, name: str) -> tuple[Snapshot, ...]:
        return self.get(name).snapshots or ()

    async def refresh(self, name: str, what: tuple[str, ...] = ALL) -> GuestSnapshot:
        """Fetch ``what`` for one guest now; keep what cannot be fetched as it was."""
        try:
            mon = self.fleet.monitor(name)
        except KvmError:
            return self.get(name)
        fetched: dict[str, object] = {}
        getters = {SNAPSHOTS: mon.snapshots, PARAMETERS: mon.migrate_parameters,
                   CAPABILITIES: mon.migrate_capabilities, STATUS: mon.status, MIGRATION: mon.migration,
                   MEMORY: mon.ram_size}
        for key in what:
            try:
                fetched[key] = await getters[key]()
            except KvmError as e:
                log.info("%s: refreshing %s failed: %s", name, key, e)
        old = self.get(name)
        new = GuestSnapshot(
            status=fetched.get(STATUS, old.status),               # type: ignore[arg-type]
            migration=fetched.get(MIGRATION, old.migration),      # type: ignore[arg-type]
            snapshots=fetched.get(SNAPSHOTS, old.snapshots),      # type: ignore[arg-type]
            parameters=fetched.get(PARAMETERS, old.parameters),   # type: ignore[arg-type]
            capabilities=fetched.get(CAPABILITIES, old.capabilities),  # type: ignore[arg-type]
            when=time.monotonic(),
            ram_bytes=fetched.get(MEMORY, old.ram_bytes))          # type: ignore[arg-type]
        self._data[name] = new
        return new

    def schedule(self, name: str, *what: str) -> None:
        """Refresh in the background (one task per guest and kind at a time); a no-op outside a loop."""
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return
        for key in what or ALL:
            task = self._tasks.get((name, key))
            if task is not None and not task.done():
                continue
            self._tasks[(name, key)] = asyncio.create_task(self._run(name, key), name=f"guestdata-{name}-{key}")

    async def _run(self, name: str, key: str) -> None:
        await self.refresh(name, (key,))

    def dirty_rate(self, name: str) -> DirtyRate | None:
        """The last on-demand dirty-rate measurement of ``name``, if any."""
        return self._dirty.get(name)

    async def measure_dirty_rate(self, name: str, seconds: int = 1) -> DirtyRate:
        """Measure how fast ``name`` dirties memory now (calc-dirty-rate over ``seconds``); cached."""
        result = await self.fleet.monitor(name).measure_dirty_rate(seconds)
        self._dirty[name] = result
        return result

    async def refresh_all(self) -> None:
        await asyncio.gather(*(self.refresh(g.name) for g in self.fleet))

    async def aclose(self) -> None:
        tasks = list(self._tasks.values())
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._tasks.clear()

