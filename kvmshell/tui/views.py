"""What the dashboard shows, as frozen values built by pure functions from the core's typed data.

Sources (live or recorded) build these; widgets compare the new value with the one they show and
redraw only what changed. Nothing here awaits or touches a monitor.
"""

from __future__ import annotations

import datetime
import enum
import re
from collections.abc import Sequence
from dataclasses import dataclass

from kvmshell.core.values.units import human_bytes
from kvmshell.core.migration.model.predict import Prediction, Verdict
from kvmshell.core.migration.model.samples import Sample
from kvmshell.core.values.models import Event, MigrationInfo, MigrationStatus, Status

SERIES_POINTS = 600          # samples kept for the sparklines (5 minutes at 2 Hz)


class Badge(enum.Enum):
    IDLE = "idle"
    SETUP = "setup"
    ACTIVE = "active"
    POSTCOPY = "postcopy"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"
    WONT_CONVERGE = "will-not-converge"
    INCOMING = "incoming"
    UNKNOWN = "-"


BADGE_ORDER = {b: i for i, b in enumerate((Badge.WONT_CONVERGE, Badge.FAILED, Badge.ACTIVE, Badge.POSTCOPY,
                                           Badge.SETUP, Badge.INCOMING, Badge.CANCELLED, Badge.COMPLETED,
                                           Badge.IDLE, Badge.UNKNOWN))}


@dataclass(frozen=True)
class GuestRow:
    """One line of the guest list."""

    name: str
    host: str
    state: str                 # run state, or the connection state when there is no monitor
    ram: int | None            # bytes
    kind: str                  # qmp / hmp
    badge: Badge
    badge_text: str            # "active 63 %"
    reachable: bool
    reason: str | None = None  # why it is unreachable

    @property
    def ram_text(self) -> str:
        if not self.ram:
            return "-"
        gib = self.ram / 2**30
        return f"{gib:.1f} GiB" if gib >= 1 else f"{self.ram / 2**20:.0f} MiB"

    @property
    def state_text(self) -> str:
        if not self.reachable and self.reason:
            return f"{self.state}: {self.reason}"
        return self.state

    def matches(self, text: str) -> bool:
        """For the filter: a case-insensitive substring of any column."""
        t = text.lower().strip()
        return not t or any(t in c.lower() for c in (self.name, self.host, self.state_text, self.kind,
                                                      self.badge_text, self.ram_text))


class SortKey(enum.Enum):
    NAME = "name"
    HOST = "host"
    STATE = "state"
    RAM = "ram"
    KIND = "kind"
    MIGRATION = "migration"


def sort_rows(rows: Sequence[GuestRow], key: SortKey, reverse: bool = False) -> list[GuestRow]:
    def k(r: GuestRow) -> tuple[object, ...]:
        if key is SortKey.HOST:
            return (r.host, r.name)
        if key is SortKey.STATE:
            return (not r.reachable, r.state, r.name)
        if key is SortKey.RAM:
            return (r.ram or 0, r.name)
        if key is SortKey.KIND:
            return (r.kind, r.name)
        if key is SortKey.MIGRATION:
            return (BADGE_ORDER[r.badge], r.name)
        return (r.name,)
    return sorted(rows, key=k, reverse=reverse)


def fraction_of(s: Sample) -> float | None:
    """How much of the RAM is across: 1 - remaining/total (the dirty set, after the first pass)."""
    if s.status is MigrationStatus.COMPLETED:
        return 1.0
    if not s.total:
        return None
    return min(1.0, max(0.0, 1 - s.remaining / s.total))


def badge_for(sample: Sample | None, prediction: Prediction | None, outcome: str | None) -> tuple[Badge, str]:
    """The badge of a guest kvmshell migrates (or follows), from its latest sample and prediction."""
    if outcome is not None:
        if outcome == "completed":
            return Badge.COMPLETED, "completed"
        if outcome == "cancelled":
            return Badge.CANCELLED, "cancelled"
        return Badge.FAILED, outcome if outcome == "failed" else f"failed ({outcome})"
    if sample is None:
        return Badge.SETUP, "setup"
    return badge_for_status(sample.status, fraction_of(sample),
                            prediction.verdict if prediction is not None else None)


def badge_for_status(status: MigrationStatus, fraction: float | None = None,
                     verdict: Verdict | None = None) -> tuple[Badge, str]:
    if status is MigrationStatus.NONE:
        return Badge.IDLE, "idle"
    if status is MigrationStatus.SETUP:
        return Badge.SETUP, "setup"
    if status.is_postcopy:
        return Badge.POSTCOPY, "postcopy" if status is MigrationStatus.POSTCOPY_ACTIVE else status.value
    if status is MigrationStatus.COMPLETED:
        return Badge.COMPLETED, "completed"
    if status is MigrationStatus.FAILED:
        return Badge.FAILED, "failed"
    if status in (MigrationStatus.CANCELLED, MigrationStatus.CANCELLING):
        return Badge.CANCELLED, status.value
    if verdict is Verdict.WILL_NOT_CONVERGE:
        return Badge.WONT_CONVERGE, "will-not-converge"
    if status.is_active:
        pct = f" {fraction * 100:.0f} %" if fraction is not None else ""
        return Badge.ACTIVE, f"active{pct}"
    return Badge.UNKNOWN, status.value


def is_savevm_trace(info: MigrationInfo) -> bool:
    """QEMU 7.2 leaves `query-migrate` at "completed" after a savevm (it saves through the migration
    code), with a total time of 0: that is a snapshot, not a migration."""
    return info.status is MigrationStatus.COMPLETED and not info.total_time_ms


def badge_for_info(info: MigrationInfo | None) -> tuple[Badge, str]:
    """The badge of a guest kvmshell does not follow, from its last `query-migrate`. A migration that
    runs from here (the source reports RAM figures; a receiving side does not) says how to adopt it."""
    if info is None or is_savevm_trace(info):
        return Badge.IDLE, "idle"
    fraction = None
    if info.ram is not None and info.ram.total:
        fraction = min(1.0, max(0.0, 1 - info.ram.remaining / info.ram.total))
    badge, text = badge_for_status(info.status, fraction)
    if info.status.is_active and info.ram is not None:
        text = f"migrating, {text} (not followed: `migrate --follow` to adopt)"
    return badge, text


def state_of(status: Status | None, connection: str) -> str:
    if status is None:
        return connection
    return str(status)


# -- the migration pane ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Figures:
    remaining: str = "-"
    dirty_rate: str = "-"
    throughput: str = "-"
    pass_no: str = "-"
    qemu_downtime: str = "-"
    predicted_downtime: str = "-"
    time_left: str = "-"
    elapsed: str = "-"
    throttle: str = "-"


@dataclass(frozen=True)
class MigrationView:
    guest: str
    title: str                        # "vm-src -> vm-dst, strategy auto"
    status: str
    running: bool
    figures: Figures
    verdict: str                      # "will converge", "will not converge (rough)"...
    verdict_kind: str                 # good / bad / unknown / done
    reason: str
    advice: str                       # what would converge, when it will not
    fraction: float | None
    progress_note: str
    remaining: tuple[float, ...] = ()
    dirty: tuple[float, ...] = ()
    throughput: tuple[float, ...] = ()
    decisions: tuple[str, ...] = ()
    outcome: str | None = None        # the outcome's message, once it is over
    outcome_ok: bool = False


@dataclass(frozen=True)
class PaneView:
    """Everything the migration pane shows for the selected guest."""

    guest: str | None
    reachable: bool = True
    headline: str = ""                 # for an unreachable guest, or no guest at all
    migration: MigrationView | None = None
    summary: str = ""                  # the last migration's summary when none runs
    dirty_rate: str = ""               # the last on-demand measurement, or how to take one


def rate(x: float | None) -> str:
    if x is None:
        return "-"
    return f"{x / 1e6:.1f} MB/s" if x < 10e6 else f"{x / 1e6:.0f} MB/s"


def seconds(x: float | None) -> str:
    if x is None:
        return "-"
    if x >= 120:
        return f"{x / 60:.0f} min"
    return f"{x:.1f} s"


def ms(x: float | None) -> str:
    return "-" if x is None else f"{x:.0f} ms"


def migration_view(guest: str, samples: Sequence[Sample], prediction: Prediction | None,
                   decisions: Sequence[str], *, dest: str | None, strategy: str,
                   outcome: tuple[str, str] | None = None) -> MigrationView:
    """The pane's view of a migration from its samples (oldest first), the model's prediction and the
    strategy's decisions. ``outcome`` is (status, message) once it is over."""
    last = samples[-1] if samples else None
    running = outcome is None and (last is None or not last.status.is_finished)
    status = outcome[0] if outcome is not None else (str(last.status) if last is not None else "setup")
    title = f"{guest} -> {dest or 'an unmanaged destination'}" + (f", strategy {strategy}" if strategy != "none" else "")
    fig = Figures()
    fraction, note = None, "waiting for the first sample"
    if last is not None:
        done = last.status is MigrationStatus.COMPLETED
        fig = Figures(
            remaining=human_bytes(last.remaining) if not done else "0 B",
            dirty_rate=rate(last.dirty_bytes_rate) if last.pass_no > 1 or last.dirty_bytes_rate else "first pass",
            throughput=rate(last.throughput) if not done else rate(last.transferred / max(last.t, 1e-3)),
            pass_no=str(last.pass_no or "-"),
            qemu_downtime=ms(last.expected_downtime_ms) if not done else ms(last.downtime_ms) + " (real)",
            predicted_downtime="-", time_left="-",
            elapsed=seconds((last.total_time_ms or 0) / 1000 if done and last.total_time_ms else last.t),
            throttle=f"{last.cpu_throttle} %" if last.cpu_throttle else "off")
        fraction = fraction_of(last)
        if done:
            note = "completed"
        elif last.pass_no <= 1:
            note = f"first pass: {human_bytes(last.remaining)} of {human_bytes(last.total)} to send"
        else:
            note = f"pass {last.pass_no}: {human_bytes(last.remaining)} dirty to send"
    verdict, kind, reason, advice = "no prediction yet", "unknown", "", ""
    if prediction is not None:
        verdict = prediction.verdict.value + (" (rough)" if prediction.rough else "")
        kind = {Verdict.CONVERGES: "good", Verdict.WILL_NOT_CONVERGE: "bad", Verdict.DONE: "done"}.get(
            prediction.verdict, "unknown")
        reason = prediction.reason
        if prediction.verdict is Verdict.CONVERGES:
            fig = _with(fig, predicted_downtime=ms(prediction.downtime_ms),
                        time_left=seconds(prediction.time_left_s) if running else "-")
        elif prediction.verdict is Verdict.WILL_NOT_CONVERGE:
            fig = _with(fig, predicted_downtime="> limit", time_left="never")
            knobs = []
            if prediction.downtime_limit_needed_ms:
                knobs.append(f"downtime limit >= {prediction.downtime_limit_needed_ms:.0f} ms")
            if prediction.bandwidth_needed:
                knobs.append(f"bandwidth >= {rate(prediction.bandwidth_needed)}")
            advice = ("would converge with " + " or ".join(knobs)) if knobs else ""
        elif prediction.verdict is Verdict.UNCERTAIN:
            fig = _with(fig, predicted_downtime="?", time_left="?" if running else "-")
            advice = prediction.outcomes()
        elif prediction.verdict is Verdict.UNKNOWN and prediction.time_left_s is not None and running:
            fig = _with(fig, time_left=seconds(prediction.time_left_s) + "+")
    if outcome is not None:
        kind = "done" if outcome[0] == "completed" else "bad"
        verdict = outcome[0]
    tail = list(samples[-SERIES_POINTS:])
    return MigrationView(
        guest=guest, title=title, status=status, running=running, figures=fig, verdict=verdict,
        verdict_kind=kind, reason=reason, advice=advice, fraction=fraction, progress_note=note,
        remaining=tuple(float(s.remaining) for s in tail),
        dirty=tuple(float(s.dirty_bytes_rate) for s in tail),
        throughput=tuple(float(s.throughput) for s in tail),
        decisions=tuple(decisions[-8:]),
        outcome=outcome[1] if outcome is not None else None,
        outcome_ok=outcome is not None and outcome[0] == "completed")


def _with(fig: Figures, **kw: str) -> Figures:
    return Figures(**{**fig.__dict__, **kw})


def info_summary(info: MigrationInfo | None) -> str:
    """One line about the last migration QEMU remembers (for guests kvmshell did not migrate)."""
    if info is None or info.status is MigrationStatus.NONE or is_savevm_trace(info):
        return "no migration since this QEMU started"
    parts = [f"last migration: {info.status.value}"]
    if info.total_time_ms is not None:
        parts.append(f"total {info.total_time_ms / 1000:.2f} s")
    if info.downtime_ms is not None:
        parts.append(f"downtime {info.downtime_ms} ms")
    if info.ram is not None and info.ram.transferred:
        parts.append(f"{info.ram.transferred / 1e6:.0f} MB sent")
    if info.error:
        parts.append(info.error)
    return ", ".join(parts)


# -- the events log -------------------------------------------------------------------------------

_EVENT_TEXT = {
    "STOP": "stopped", "RESUME": "resumed", "SHUTDOWN": "shut down", "RESET": "reset",
    "POWERDOWN": "powerdown requested", "GUEST_PANICKED": "guest panicked",
}


@dataclass(frozen=True)
class LogLine:
    when: float              # epoch seconds
    guest: str
    text: str
    kind: str                # event / decision / error / good


def event_line(ev: Event) -> LogLine | None:
    """The events log's line for an event; None for the ones not worth a line."""
    name, d = ev.name, ev.data
    kind = "event"
    if name == "MIGRATION":
        text = f"migration {d.get('status')}"
        kind = "error" if d.get("status") == "failed" else "good" if d.get("status") == "completed" else "event"
    elif name == "MIGRATION_PASS":
        return None                   # one per pass: the pane's pass figure says it
    elif name == "kvmshell.MIGRATION_DECISION":
        text = f"{d.get('decision')}: {d.get('reason')}"
        kind = "decision"
    elif name == "kvmshell.MIGRATION_FINISHED":
        text = f"migration {d.get('status')}: {d.get('message')}"
        kind = "good" if d.get("status") == "completed" else "error"
    elif name == "kvmshell.DISCONNECTED":
        text, kind = f"monitor lost: {d.get('reason')}", "error"
    elif name == "kvmshell.UNREACHABLE":
        text, kind = f"unreachable: {d.get('reason')}", "error"
    elif name == "kvmshell.CONNECTED":
        text, kind = f"monitor connected (QEMU {d.get('version') or '?'})", "good"
        if d.get("notice"):
            text += f"; note: {d.get('notice')}"
    elif name == "JOB_STATUS_CHANGE":
        if d.get("status") not in ("concluded",):
            return None
        job = str(d.get("id"))
        m = re.fullmatch(r"kvmshell-(.+)-\d+", job)
        text = f"{m.group(1) if m else job} job {d.get('status')}"
    elif name in _EVENT_TEXT:
        text = _EVENT_TEXT[name]
    else:
        detail = ", ".join(f"{k}={v}" for k, v in list(d.items())[:3])
        text = name + (f" ({detail})" if detail else "")
    return LogLine(ev.timestamp, ev.guest, text, kind)


def clock_text(ts: float, tz: datetime.tzinfo | None) -> str:
    return datetime.datetime.fromtimestamp(ts, tz).strftime("%H:%M:%S")
