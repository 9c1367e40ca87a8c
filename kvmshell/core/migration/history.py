"""The migration history: every migration a MigrationJob runs, and every static migration
(``record_static``), leaves its trace and a one-line JSON summary in the state directory, whatever the
face that started it.

Layout (``state_dir()/migrations``): ``ID.jsonl`` is the trace (the format of ``--trace``, read by
`kvmshell report`), ``history.jsonl`` the index, one summary per line, oldest first. Only the last
``CAP`` migrations are kept: older summaries and their traces are removed as new ones are added.
Keeping the history never fails a migration: a write error is logged and the migration goes on.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kvmshell.config import state_dir
from kvmshell.core.migration.live.request import MigrationOutcome, MigrationRequest
from kvmshell.core.migration.model.samples import Sample, TraceEvent, TraceHeader, TraceWriter
from kvmshell.core.monitor.base import Monitor
from kvmshell.errors import CommandFailed, KvmError

if TYPE_CHECKING:
    from kvmshell.core.migration.live.job import MigrationJob

log = logging.getLogger(__name__)

CAP = 200                               # migrations kept (summaries and traces)
INDEX = "history.jsonl"


@dataclass(frozen=True)
class HistoryEntry:
    """One migration's summary: numbers as numbers, the unit in each key's name."""

    id: str
    guest: str
    source: str                         # where the guest ran: "local" or the SSH host
    dest: str                           # the destination guest, or the URI
    strategy: str
    outcome: str                        # completed / failed / cancelled / stalled / source-lost / postcopy-paused
    started_at: str                     # ISO 8601, UTC
    total_s: float | None = None
    downtime_ms: int | None = None
    bytes: int | None = None
    trace: str = ""                     # the trace file

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["from"], d["to"] = d.pop("source"), d.pop("dest")
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> HistoryEntry:
        return cls(id=str(d["id"]), guest=str(d["guest"]), source=str(d.get("from", "")), dest=str(d.get("to", "")),
                   strategy=str(d.get("strategy", "")), outcome=str(d.get("outcome", "")),
                   started_at=str(d.get("started_at", "")), total_s=d.get("total_s"),
                   downtime_ms=d.get("downtime_ms"), bytes=d.get("bytes"), trace=str(d.get("trace", "")))


class MigrationHistory:
    """The history in ``directory``; ``cap`` migrations kept."""

    def __init__(self, directory: Path | str, cap: int = CAP) -> None:
        self.dir = Path(directory)
        self.cap = cap

    @classmethod
    def default(cls) -> MigrationHistory:
        return cls(state_dir() / "migrations")

    @property
    def index(self) -> Path:
        return self.dir / INDEX

    def new_id(self, guest: str, now: float | None = None) -> str:
        """``YYYYMMDD-HHMMSS-GUEST``, with ``-2``, ``-3``... when that trace exists already."""
        base = time.strftime("%Y%m%d-%H%M%S", time.gmtime(now if now is not None else time.time())) + f"-{guest}"
        ident, n = base, 1
        while (self.dir / f"{ident}.jsonl").exists():
            n += 1
            ident = f"{base}-{n}"
        return ident

    def open_trace(self, guest: str) -> tuple[str, TraceWriter] | None:
        """A new id and the writer of its trace; None (logged) when the directory cannot be written."""
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            ident = self.new_id(guest)
            return ident, TraceWriter.open(self.dir / f"{ident}.jsonl")
        except OSError as e:
            log.warning("migration history: cannot write a trace in %s: %s", self.dir, e)
            return None

    def record(self, entry: HistoryEntry) -> None:
        """Append ``entry`` to the index and drop what is beyond the cap. Errors are logged."""
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            with open(self.index.with_name(INDEX + ".lock"), "a") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)      # two kvmshells ending migrations at once: one at a time
                with open(self.index, "a", encoding="utf-8") as f:
                    f.write(json.dumps(entry.to_json(), sort_keys=True) + "\n")
                self._prune()
        except OSError as e:
            log.warning("migration history: cannot record %s in %s: %s", entry.id, self.index, e)

    def _prune(self) -> None:
        lines = self.index.read_text(encoding="utf-8").splitlines()
        if len(lines) <= self.cap:
            return
        dropped, kept = lines[:-self.cap], lines[-self.cap:]
        tmp = self.index.with_name(f"{INDEX}.{os.getpid()}.tmp")
        tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
        os.replace(tmp, self.index)
        for line in dropped:
            try:
                trace = json.loads(line).get("trace")
            except ValueError:
                continue
            if trace and Path(trace).parent == self.dir:       # a --trace FILE of the user's stays
                Path(trace).unlink(missing_ok=True)

    def entries(self) -> list[HistoryEntry]:
        """The summaries, oldest first; an unreadable line is skipped (and logged), an unreadable
        index is a KvmError."""
        try:
            text = self.index.read_text(encoding="utf-8")
        except FileNotFoundError:
            return []
        except OSError as e:
            raise KvmError(f"cannot read the migration history {self.index}: {e.strerror}", title="history") from None
        out = []
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                out.append(HistoryEntry.from_json(json.loads(line)))
            except (ValueError, KeyError, TypeError) as e:
                log.warning("%s:%d: not a history line (%s)", self.index, number, e)
        return out

    def find(self, ident: str) -> HistoryEntry | None:
        """The entry with that id (or the only one whose id starts with it)."""
        entries = self.entries()
        exact = [e for e in entries if e.id == ident]
        if exact:
            return exact[-1]
        prefixed = [e for e in entries if e.id.startswith(ident)]
        return prefixed[0] if len(prefixed) == 1 else None


class TraceTee(TraceWriter):
    """Writes each trace line to the user's ``--trace`` file (if any) and to the history's copy; a
    failing history copy is dropped (logged), never the migration."""

    def __init__(self, user: TraceWriter | None, kept: TraceWriter | None, ident: str | None = None) -> None:
        self.user, self.kept, self.ident = user, kept, ident
        self.started = time.time()

    def write(self, item: Sample | TraceEvent | TraceHeader) -> None:
        if self.user is not None:
            self.user.write(item)
        if self.kept is not None:
            try:
                self.kept.write(item)
            except OSError as e:
                log.warning("migration history: trace write failed, the history keeps no trace: %s", e)
                self._drop_kept()

    def _drop_kept(self) -> None:
        kept, self.kept = self.kept, None
        try:
            if kept is not None:
                kept.close()
        except OSError:
            pass

    def close(self) -> None:
        if self.user is not None:
            self.user.close()
        self._drop_kept()


async def open_traces(history: MigrationHistory, source: Monitor, req: MigrationRequest,
                      uri: str | None) -> TraceTee:
    """The job's trace: the history's copy and ``req.trace_path`` (CommandFailed if that one cannot
    be written), with the header written."""
    user = None
    if req.trace_path:
        try:
            user = TraceWriter.open(req.trace_path)
        except OSError as e:
            raise CommandFailed(f"cannot write the trace {req.trace_path}: {e.strerror}", guest=req.source) from None
    kept = history.open_trace(req.source)
    tee = TraceTee(user, kept[1] if kept else None, kept[0] if kept else None)
    try:
        params = await source.migrate_parameters()
        caps = await source.migrate_capabilities()
    except BaseException:
        tee.close()
        raise
    tee.write(TraceHeader(req.source, tee.started, params=dict(params.values), capabilities=dict(caps.states),
                          strategy=req.strategy, link_bytes_per_s=req.link,
                          note=f"to {req.dest or uri or 'an unmanaged destination'}"))
    return tee


def record(history: MigrationHistory, tee: TraceTee, job: MigrationJob, outcome: MigrationOutcome | None) -> None:
    """Append the job's summary to the history (after its trace is closed); never raises."""
    if tee.ident is None:
        return
    try:
        last = job.sampler.ring.last
        ssh = getattr(job.source.address, "ssh", None)
        o = outcome or MigrationOutcome("interrupted", "kvmshell stopped following the migration")
        total = o.total_s if o.total_s is not None else (round(last.t, 3) if last is not None else None)
        history.record(HistoryEntry(
            id=tee.ident, guest=job.req.source, source=str(ssh) if ssh else "local",
            dest=job.req.dest or job.uri or "", strategy=job.req.strategy, outcome=o.status,
            started_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(tee.started)), total_s=total,
            downtime_ms=o.downtime_ms, bytes=o.bytes_sent if o.bytes_sent is not None else
            (last.transferred if last is not None else None), trace=str(history.dir / f"{tee.ident}.jsonl")))
    except Exception:                   # a bug here must not hide the migration's outcome
        log.exception("migration history: cannot record %s", tee.ident)


def record_static(history: MigrationHistory, *, guest: str, source: str, dest: str, outcome: str, started: float,
                  total_s: float, sent_bytes: int | None, steps: list[tuple[float, str, str]]) -> None:
    """Keep a static migration (savevm, copy, loadvm) in the history: its trace holds the header and
    one kvmshell event per step done (``steps``: seconds from the start, name, what it did), then an
    ``outcome`` event (status, sent_bytes), and no samples, as no RAM is streamed. Never raises."""
    kept = history.open_trace(guest)
    if kept is None:
        return
    ident, writer = kept
    try:
        writer.write(TraceHeader(guest, started, strategy="static", note=f"to {dest}"))
        for t, name, what in steps:
            writer.write(TraceEvent(t, "kvmshell", name, {"message": what}))
        writer.write(TraceEvent(total_s, "kvmshell", "outcome", {"status": outcome, "sent_bytes": sent_bytes}))
        writer.close()
        history.record(HistoryEntry(
            id=ident, guest=guest, source=source, dest=dest, strategy="static", outcome=outcome,
            started_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)), total_s=round(total_s, 3),
            bytes=sent_bytes, trace=str(history.dir / f"{ident}.jsonl")))
    except Exception:                   # a bug here must not hide the migration's outcome
        log.exception("migration history: cannot record %s", ident)
