"""Where the dashboard's data comes from: a protocol, and the live source over a ``Session``.

The app is given a source and never reaches past it: it reads frozen views (``rows``, ``pane``)
that cost no I/O, asks the source to ``poll`` (in a worker), and runs commands through
``run_line`` - the same command language as the shell. ``replay.ReplaySource`` implements the
same protocol from a recorded trace, with a fixed clock, for deterministic pictures.
"""

from __future__ import annotations

import asyncio
import datetime
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Protocol

from kvmshell.config import Defaults, state_dir
from kvmshell.core.commands.results import Outcome
from kvmshell.core.commands.completion import Candidate, CompletionEngine
from kvmshell.core.monitor.fleet import GuestState
from kvmshell.core.monitor.guestdata import MEMORY, MIGRATION, SNAPSHOTS, STATUS
from kvmshell.core.migration.model.samples import Sample
from kvmshell.core.values.models import Event, Snapshot
from kvmshell.core.commands.session import Session
from kvmshell.tui.history import History
from kvmshell.tui.views import (
    Badge, GuestRow, PaneView, badge_for, badge_for_info, clock_text, info_summary, migration_view, rate, state_of,
)

Confirmer = Callable[[str], Awaitable[bool]]
Editor = Callable[[str], Awaitable[str]]
ProgressSink = Callable[[str, str], None]

MIGRATION_EVERY = 5          # idle guests: query-migrate every 5th status poll (events say the rest)


class Clock:
    """Wall-clock time and the zone to show it in. Tests use a ``FixedClock``."""

    tz: datetime.tzinfo | None = None

    def wall(self) -> float:
        return time.time()

    def hms(self, ts: float) -> str:
        return clock_text(ts, self.tz)


class FixedClock(Clock):
    def __init__(self, at: float, tz: datetime.tzinfo = datetime.timezone.utc) -> None:
        self.at = at
        self.tz = tz

    def wall(self) -> float:
        return self.at


class DashboardSource(Protocol):
    clock: Clock
    history: History
    defaults: Defaults
    current: str | None

    @property
    def names(self) -> list[str]: ...

    def rows(self) -> list[GuestRow]: ...

    def pane(self, name: str | None) -> PaneView: ...

    def running(self) -> list[str]: ...

    def migrating(self, name: str) -> bool: ...

    def tags(self, name: str) -> tuple[Snapshot, ...]: ...

    async def poll(self) -> None: ...

    def refresh_soon(self, name: str, *what: str) -> None: ...

    def want_tags(self, name: str) -> None: ...

    def subscribe(self, callback: Callable[[Event], None]) -> Callable[[], None]: ...

    async def run_line(self, line: str) -> list[Outcome]: ...

    def complete(self, text: str) -> list[Candidate]: ...

    async def measure_dirty_rate(self, name: str) -> float: ...

    def attach_ui(self, confirmer: Confirmer | None, progress: ProgressSink | None,
                  editor: Editor | None = None) -> None: ...

    def recent_events(self) -> list[Event]: ...


def short_reason(reason: str | None, address: str) -> str | None:
    """A reason without the monitor address it starts with (the list has no room for paths)."""
    if reason and reason.startswith(address):
        return reason[len(address):].lstrip(": ") or reason
    return reason


def history_path() -> Path:
    return state_dir() / "history"


class SessionSource:
    """The live source: a kvmshell ``Session`` (its fleet, cached guest data, migration jobs)."""

    def __init__(self, session: Session, *, clock: Clock | None = None, history: History | None = None) -> None:
        self.session = session
        self.clock = clock or Clock()
        self.history = history if history is not None else History.load(history_path())
        self.defaults = session.config.defaults
        self.engine = CompletionEngine(session)
        self._tick = 0
        self._ram_asked: set[str] = set()

    # -- what the app reads (no I/O) ------------------------------------------------------------
    @property
    def current(self) -> str | None:
        return self.session.current

    @current.setter
    def current(self, name: str | None) -> None:
        self.session.current = name

    @property
    def names(self) -> list[str]:
        return self.session.fleet.names

    def running(self) -> list[str]:
        return [name for name in self.session.migrations if self.session.running_job(name) is not None]

    def migrating(self, name: str) -> bool:
        if self.session.running_job(name) is not None:
            return True
        info = self.session.data.get(name).migration
        return info is not None and info.status.is_active

    def tags(self, name: str) -> tuple[Snapshot, ...]:
        return self.session.data.tags(name)

    def rows(self) -> list[GuestRow]:
        s = self.session
        incoming = {job.req.dest for job in s.migrations.values() if job.outcome is None and job.req.dest}
        rows = []
        for g in s.fleet:
            data = s.data.get(g.name)
            reachable = g.state is GuestState.CONNECTED
            job = s.migrations.get(g.name)
            if job is not None:
                badge, text = badge_for(job.sampler.ring.last, job.prediction,
                                        job.outcome.status if job.outcome is not None else None)
            elif g.name in incoming:
                badge, text = Badge.INCOMING, "incoming"
            else:
                badge, text = badge_for_info(data.migration)
            host = g.address.ssh.host if g.address.ssh else "local"
            rows.append(GuestRow(
                name=g.name, host=host, state=state_of(data.status if reachable else None, g.state.value),
                ram=data.ram_bytes, kind=g.address.protocol.value, badge=badge, badge_text=text,
                reachable=reachable, reason=None if reachable else short_reason(g.reason, str(g.address))))
        return rows

    def pane(self, name: str | None) -> PaneView:
        s = self.session
        if name is None or name not in s.fleet:
            return PaneView(None, headline="no guest selected: pick one in the list")
        g = s.fleet.get(name)
        reachable = g.state is GuestState.CONNECTED
        headline = "" if reachable else f"{name} is {g.state.value}: {g.reason or 'connecting'}"
        data = s.data.get(name)
        job = s.migrations.get(name)
        mv = None
        if job is not None:
            outcome = (job.outcome.status, job.outcome.message) if job.outcome is not None else None
            mv = migration_view(name, job.sampler.ring.list(), job.prediction, job.decisions,
                                dest=job.req.dest or job.uri, strategy=job.req.strategy, outcome=outcome)
        elif data.migration is not None and data.migration.status.is_active:
            mv = migration_view(name, [Sample.from_info(data.migration, (data.migration.total_time_ms or 0) / 1000,
                                                        None)], None, [], dest=None, strategy="none")
        if job is not None and job.outcome is not None:
            summary = f"last migration: {job.outcome.message}"
        else:
            summary = info_summary(data.migration) if data.migration is not None else ""
        measured = s.data.dirty_rate(name)
        if measured is not None:
            dirty = (f"dirty rate {rate(measured.bytes_per_s)} (measured {self.clock.hms(measured.when)} over "
                     f"{measured.window_s} s; d measures again)")
        else:
            dirty = "dirty rate not measured: d measures it (calc-dirty-rate for 1 s costs the guest a little)"
        return PaneView(name, reachable=reachable, headline=headline, migration=mv, summary=summary,
                        dirty_rate=dirty)

    def recent_events(self) -> list[Event]:
        return []

    # -- I/O, from the app's workers ------------------------------------------------------------
    async def poll(self) -> None:
        """Refresh every reachable guest's run state (and, less often, its migration status)."""
        s = self.session
        self._tick += 1

        async def one(name: str) -> None:
            what: tuple[str, ...] = (STATUS,)
            info = s.data.get(name).migration
            if s.running_job(name) is None and (info is None or info.status.is_active
                                                or self._tick % MIGRATION_EVERY == 0):
                what += (MIGRATION,)
            if name not in self._ram_asked:
                self._ram_asked.add(name)
                what += (MEMORY,)
            await s.data.refresh(name, what)

        await asyncio.gather(*(one(g.name) for g in s.fleet if g.state is GuestState.CONNECTED))

    def refresh_soon(self, name: str, *what: str) -> None:
        if name in self.session.fleet:
            self.session.data.schedule(name, *(what or (STATUS, MIGRATION)))

    def want_tags(self, name: str) -> None:
        self.refresh_soon(name, SNAPSHOTS)

    def subscribe(self, callback: Callable[[Event], None]) -> Callable[[], None]:
        return self.session.fleet.subscribe(callback)

    async def run_line(self, line: str) -> list[Outcome]:
        return await self.session.run_line(line)

    def complete(self, text: str) -> list[Candidate]:
        return self.engine.complete(text)

    async def measure_dirty_rate(self, name: str) -> float:
        return (await self.session.data.measure_dirty_rate(name)).bytes_per_s

    def attach_ui(self, confirmer: Confirmer | None, progress: ProgressSink | None,
                  editor: Editor | None = None) -> None:
        self.session.confirmer = confirmer
        self.session.editor = editor
        self.session.progress_sink = progress
