"""A kvmshell session over real lab guests, as the migration tests drive it: ``attached(src, dst)``."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

from kvmshell.core.commands.registry import default_registry
from kvmshell.core.commands.results import Outcome
from kvmshell.core.commands.session import Session
from kvmshell.core.migration.live.job import FINISHED, MigrationJob
from kvmshell.core.values.address import Address
from kvmshell.core.monitor.fleet import Fleet
from kvmshell.core.values.models import Event
from tests.waiting import wait_for


class Guest(Protocol):
    """A lab guest (``LabGuest``, ``LinuxGuest``): what the session needs of it is its monitor's address."""

    @property
    def address(self) -> Address: ...


G = TypeVar("G", bound=Guest)


class Lines:
    """Lines run in ``session`` on one guest, and the end of a migration read from ``events``."""

    session: Session
    events: asyncio.Queue[Event]

    async def run(self, line: str) -> Outcome:
        outcomes = await self.session.run_line(line)
        assert len(outcomes) == 1
        return outcomes[0]

    async def ok(self, line: str) -> str:
        o = await self.run(line)
        assert o.ok, o.error
        assert o.result is not None
        return o.result.text()

    async def finished(self, timeout: float = 60) -> Event:
        async with asyncio.timeout(timeout):
            while True:
                ev = await self.events.get()
                if ev.name == FINISHED:
                    return ev


@dataclass
class Pair(Lines, Generic[G]):
    """The session, its guests ("src", and "dst" unless attached to one guest) and its events, queued."""

    session: Session
    src: G
    dst: Any          # a G, or None when the session has the source alone
    events: asyncio.Queue[Event]

    def job(self) -> MigrationJob:
        return self.session.migrations["src"]

    async def until_status(self, *statuses: str, timeout: float = 30) -> None:
        await wait_for(lambda: self.session.fleet.monitor("src").migration(),
                       lambda m: m.status.value in statuses, timeout=timeout, what=f"status in {statuses}")


@asynccontextmanager
async def attached(src: G, dst: G | None = None) -> AsyncIterator[Pair[G]]:
    """A session over the guests (as "src" and, when given, "dst"), its events queued; closed on the way out."""
    events: asyncio.Queue[Event] = asyncio.Queue()
    async with Fleet() as fleet:
        fleet.subscribe(events.put_nowait)
        fleet.add("src", src.address)
        if dst is not None:
            fleet.add("dst", dst.address)
        await fleet.start()
        session = Session(fleet, default_registry(), assume_yes=True)
        try:
            yield Pair(session, src, dst, events)
        finally:
            await session.aclose()
