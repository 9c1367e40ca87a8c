"""A dashboard source fed from a recorded migration trace (``--trace`` / tests/data/traces).

The picture it gives is a pure function of the trace, the instant ``at`` and the fixed clock, so a
rendered screen can be compared with a committed one. Commands do not run against a recording.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from kvmshell.config import Defaults
from kvmshell.core.commands.results import Outcome
from kvmshell.core.commands.completion import Candidate
from kvmshell.core.migration.live.job import DECISION, FINISHED
from kvmshell.core.migration.model.predict import assess
from kvmshell.core.migration.model.samples import Trace
from kvmshell.core.values.models import Event, MigrationStatus, Snapshot
from kvmshell.errors import KvmError
from kvmshell.tui.history import History
from kvmshell.tui.source import Clock, Confirmer, Editor, FixedClock, ProgressSink
from kvmshell.tui.views import Badge, GuestRow, PaneView, badge_for, migration_view

REPLAY_ERROR = "a recorded trace is shown: commands do not run"


@dataclass(frozen=True)
class StaticGuest:
    """A guest that only fills the list (idle, or unreachable with a reason)."""

    name: str
    state: str = "running"
    ram: int | None = 64 * 2**20
    kind: str = "qmp"
    host: str = "local"
    reason: str | None = None
    badge: Badge = Badge.IDLE


@dataclass
class ReplaySource:
    trace: Trace
    at: float                                   # seconds into the trace
    others: Sequence[StaticGuest] = ()
    dest: str = "dst"
    clock: Clock = field(default_factory=lambda: FixedClock(0.0))
    current: str | None = None
    history: History = field(default_factory=History)
    defaults: Defaults = field(default_factory=Defaults)

    def __post_init__(self) -> None:
        h = self.trace.header
        self.source_name = h.guest
        if isinstance(self.clock, FixedClock) and self.clock.at == 0.0:
            self.clock = FixedClock(h.started + self.at)
        self.samples = [s for s in self.trace.samples if s.t <= self.at]
        self.events = [e for e in self.trace.events if e.t <= self.at]
        self.downtime_s = float(h.params.get("downtime-limit", 300)) / 1000
        link = h.link_bytes_per_s
        cap = h.params.get("max-bandwidth")
        self.cap = float(cap) if isinstance(cap, (int, float)) and (link is None or cap < link) else None
        self.link = link
        self.prediction = assess(self.samples, downtime_limit_s=self.downtime_s, bandwidth_cap=self.cap,
                                 link=link) if self.samples else None
        self.decisions = [f"t={e.t:.1f}s {e.name}: {e.detail.get('reason', '')}" for e in self.events
                          if e.source == "kvmshell"]
        last = self.samples[-1] if self.samples else None
        self.finished = last is not None and MigrationStatus(last.status).is_finished
        if self.current is None:
            self.current = self.source_name

    # -- what the app reads ---------------------------------------------------------------------
    @property
    def names(self) -> list[str]:
        return [self.source_name, self.dest, *(g.name for g in self.others)]

    def running(self) -> list[str]:
        return [] if self.finished else [self.source_name]

    def migrating(self, name: str) -> bool:
        return name == self.source_name and not self.finished

    def tags(self, name: str) -> tuple[Snapshot, ...]:
        return ()

    def _outcome(self) -> tuple[str, str] | None:
        last = self.samples[-1] if self.samples else None
        if last is None or not self.finished:
            return None
        if last.status is MigrationStatus.COMPLETED:
            return ("completed", f"completed in {(last.total_time_ms or 0) / 1000:.2f} s, downtime "
                                 f"{last.downtime_ms} ms, {last.transferred / 1e6:.0f} MB sent")
        return (str(last.status), f"migration {last.status}")

    def rows(self) -> list[GuestRow]:
        last = self.samples[-1] if self.samples else None
        outcome = self._outcome()
        badge, text = badge_for(last, self.prediction, outcome[0] if outcome else None)
        ram = self.trace.header.ram_bytes or (last.total if last else None)
        rows = [GuestRow(self.source_name, "local", "running" if not self.finished else "paused (postmigrate)",
                         ram, "qmp", badge, text, True),
                GuestRow(self.dest, "local", "paused (inmigrate)" if not self.finished else "running", ram, "hmp",
                         Badge.INCOMING if not self.finished else Badge.IDLE,
                         "incoming" if not self.finished else "idle", True)]
        for g in self.others:
            reachable = g.reason is None
            rows.append(GuestRow(g.name, g.host, g.state if reachable else "unreachable", g.ram if reachable else None,
                                 g.kind, g.badge, g.badge.value if reachable else "-", reachable, g.reason))
        return rows

    def pane(self, name: str | None) -> PaneView:
        if name == self.source_name:
            mv = migration_view(name, self.samples, self.prediction, self.decisions, dest=self.dest,
                                strategy=self.trace.header.strategy or "none", outcome=self._outcome())
            return PaneView(name, migration=mv, dirty_rate="dirty rate not measured: d measures it")
        for g in self.others:
            if g.name == name and g.reason is not None:
                return PaneView(name, reachable=False, headline=f"{name} is unreachable: {g.reason}")
        return PaneView(name, summary="no migration since this QEMU started",
                        dirty_rate="dirty rate not measured: d measures it")

    def recent_events(self) -> list[Event]:
        started = self.trace.header.started
        out = []
        for e in self.events:
            if e.source == "kvmshell":
                out.append(Event(self.source_name, DECISION, {"decision": e.name, **e.detail}, started + e.t))
            else:
                out.append(Event(self.source_name, e.name, dict(e.detail), started + e.t))
        outcome = self._outcome()
        if outcome is not None:
            last_t = self.samples[-1].t
            out.append(Event(self.source_name, FINISHED, {"status": outcome[0], "message": outcome[1]},
                             started + last_t))
        return out

    # -- I/O: nothing happens in a recording ----------------------------------------------------
    async def poll(self) -> None:
        return None

    def refresh_soon(self, name: str, *what: str) -> None:
        return None

    def want_tags(self, name: str) -> None:
        return None

    def subscribe(self, callback: Callable[[Event], None]) -> Callable[[], None]:
        return lambda: None

    async def run_line(self, line: str) -> list[Outcome]:
        return [Outcome(None, error=REPLAY_ERROR, error_title="replay")]

    def complete(self, text: str) -> list[Candidate]:
        return []

    async def measure_dirty_rate(self, name: str) -> float:
        raise KvmError(REPLAY_ERROR, title="replay")

    def attach_ui(self, confirmer: Confirmer | None, progress: ProgressSink | None,
                  editor: Editor | None = None) -> None:
        return None
