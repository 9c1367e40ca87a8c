"""The state file of a migration kvmshell follows, so that another kvmshell can adopt it.

One JSON file per source monitor in ``state_dir()/running/``: who follows the migration (the pid),
between which monitors, with which strategy and request, and what kvmshell changed there: each
side's migration capabilities and parameters as they were before (the job's ``Settings``, plus the
throttle parameters a strategy may raise later), what its stages leave to finish (the disk copy, the
devices unplugged: ``resume``) and what TLS changed on each side (``tls.TlsSide``). It is written
before the job's first change to either side (``checkpoint``, again after each change until `migrate`
is sent: ``phase`` "preparing", then "prepared" once the destination listens), rewritten when the job
starts following (phase "migrating") and removed when the job concludes or its start is undone; it
stays when kvmshell dies or closes while QEMU goes on migrating, or while its start is under way.
``adopt`` reads it back. Nothing here raises for a file it cannot write or read: it is logged.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kvmshell.config import state_dir
from kvmshell.core.migration.live.resume import StorageRecord, UnplugRecord, tls_from_dict
from kvmshell.core.migration.tls import TlsSide
from kvmshell.core.values.models import MigrationInfo
from kvmshell.errors import KvmError

if TYPE_CHECKING:
    from kvmshell.core.migration.live.job import MigrationJob

log = logging.getLogger(__name__)

# what a strategy may change while the migration runs: recorded up front, kvmshell has not touched them yet
THROTTLE = ("cpu-throttle-initial", "cpu-throttle-increment", "max-cpu-throttle", "throttle-trigger-threshold",
            "vcpu-dirty-limit")
REQUEST = ("downtime_ms", "bandwidth", "link", "allow_postcopy", "interval", "stall_timeout",
           "setup_timeout")
ANSWER_S = 3.0
STALE_S = 10.0                   # the start a file records and QEMU's own may differ by this much
PHASES = ("preparing", "prepared", "migrating")    # before `migrate`: setting up, then the stages' work


@dataclass(frozen=True)
class RunningFile:
    """What one state file says. ``before``: by side ("source", "dest"), {"capabilities": {...},
    "parameters": {...}} as they were before kvmshell changed them."""

    source: str
    source_address: str
    strategy: str
    pid: int
    dest: str | None = None
    dest_address: str | None = None
    uri: str | None = None
    request: dict[str, Any] = field(default_factory=dict)
    before: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)
    stages: tuple[str, ...] = ()
    started_at: float = 0.0
    storage: StorageRecord | None = None       # the disk copy to finish (``resume``)
    unplug: UnplugRecord | None = None         # the devices to plug again
    tls: dict[str, TlsSide] = field(default_factory=dict)     # by side: what TLS changed there
    phase: str = "migrating"                   # PHASES: "migrating" once `migrate` was sent

    @property
    def starting(self) -> bool:
        """`migrate` was not sent yet: the file is about a start under way (or interrupted)."""
        return self.phase != "migrating"

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> RunningFile:
        storage, unplug = d.get("storage"), d.get("unplug")
        return cls(source=str(d["source"]), source_address=str(d["source_address"]), strategy=str(d["strategy"]),
                   pid=int(d["pid"]), dest=d.get("dest"), dest_address=d.get("dest_address"), uri=d.get("uri"),
                   request=dict(d.get("request") or {}), before=dict(d.get("before") or {}),
                   stages=tuple(d.get("stages") or ()), started_at=float(d.get("started_at") or 0.0),
                   storage=StorageRecord.from_dict(storage) if storage else None,
                   unplug=UnplugRecord.from_dict(unplug) if unplug else None,
                   tls=tls_from_dict(d.get("tls") or {}), phase=str(d.get("phase") or "migrating"))

    def to_json(self) -> dict[str, Any]:
        return asdict(self) | {"storage": self.storage.to_dict() if self.storage else None,
                               "unplug": self.unplug.to_dict() if self.unplug else None,
                               "tls": {role: side.to_dict() for role, side in self.tls.items()}}

    def describes(self, info: MigrationInfo, slack_s: float = STALE_S) -> bool:
        """The file is about the migration ``info`` describes (QEMU's total time matches its start),
        not an older one it outlived (a kvmshell that closed while it ran, say)."""
        if info.total_time_ms is None or not self.started_at:
            return True
        return abs(time.time() - info.total_time_ms / 1000 - self.started_at) <= slack_s

    @property
    def alive(self) -> bool:
        """The kvmshell that wrote it still runs (and is not this one)."""
        return self.pid != os.getpid() and pid_alive(self.pid)


def directory() -> Path:
    return state_dir() / "running"


def path_for(address: str) -> Path:
    """The file of the migration whose source is the monitor at ``address`` (names differ between kvmshells)."""
    return directory() / f"{hashlib.sha1(address.encode()).hexdigest()[:16]}.json"


def pid_alive(pid: int) -> bool:
    """A process ``pid`` runs (a zombie is not alive: it has died, only its parent has not reaped it)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def load(address: str) -> RunningFile | None:
    path = path_for(address)
    try:
        return RunningFile.from_json(json.loads(path.read_text(encoding="utf-8")))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as e:
        log.warning("migration state file %s unreadable: %s", path, e)
        return None


def write(state: RunningFile) -> None:
    """Write ``state`` atomically (a temporary file renamed over the old one)."""
    path = path_for(state.source_address)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(state.to_json(), indent=1, sort_keys=True) + "\n", encoding="utf-8")
        os.replace(tmp, path)
    except OSError as e:
        log.warning("cannot write the migration state file %s: %s", path, e)


def remove(address: str, pid: int | None = None) -> None:
    """Remove the file of ``address`` (only if ``pid`` wrote it, when given)."""
    if pid is not None:
        state = load(address)
        if state is not None and state.pid != pid:
            return
    try:
        path_for(address).unlink(missing_ok=True)
    except OSError as e:
        log.warning("cannot remove the migration state file of %s: %s", address, e)


async def save(job: MigrationJob) -> None:
    """The job follows its migration from now on: write its state file (never raises)."""
    sides = {"source": job.source, "dest": job.dest}
    before: dict[str, dict[str, dict[str, Any]]] = {}
    for role, mon in sides.items():
        if mon is not None:
            b = job.settings.before(mon.name)
            before[role] = {"capabilities": dict(b.capabilities), "parameters": dict(b.parameters)}
    started_at = time.time()
    try:
        async with asyncio.timeout(ANSWER_S):
            info = await job.source.migration()
            if info.total_time_ms is not None:          # when QEMU started it: an adopted job's too
                started_at -= info.total_time_ms / 1000
            if job.strategy.steers:
                params = before["source"]["parameters"]
                now = await job.source.migrate_parameters()
                params |= {k: v for k in THROTTLE if k not in params and (v := now.get(k)) is not None}
    except (KvmError, TimeoutError) as e:
        log.info("%s: the state file may lack the throttle parameters or the start: %s", job.req.source, e)
    req = job.req
    records = [r for st in job.work if (r := st.record()) is not None]
    write(RunningFile(source=job.source.name, source_address=str(job.source.address), strategy=req.strategy,
                      pid=os.getpid(), dest=job.dest.name if job.dest else None,
                      dest_address=str(job.dest.address) if job.dest else None, uri=job.uri,
                      request={k: getattr(req, k) for k in REQUEST}, before=before,
                      stages=tuple(st.name for st in job.work), started_at=started_at,
                      storage=next((r for r in records if isinstance(r, StorageRecord)), None),
                      unplug=next((r for r in records if isinstance(r, UnplugRecord)), None), tls=dict(job.tls)))


def checkpoint(job: MigrationJob, phase: str | None = None) -> None:
    """The job's start is under way: write what it has changed so far and is about to change (called
    before each change; ``phase`` moves it on; "migrating": `migrate` was sent just now, and ``save``
    writes the file again with QEMU's start). No QEMU is asked: nothing to wait for (never raises)."""
    if job.start_phase == "migrating" and phase is None:     # past the start: ``save`` wrote the file
        return
    if phase is not None:
        job.start_phase = phase
    before: dict[str, dict[str, dict[str, Any]]] = {}
    for role, mon in (("source", job.source), ("dest", job.dest)):
        if mon is not None:
            b = job.settings.before(mon.name)
            before[role] = {"capabilities": dict(b.capabilities), "parameters": dict(b.parameters)}
    records = [r for st in job.work if (r := st.record()) is not None]
    req = job.req
    write(RunningFile(source=job.source.name, source_address=str(job.source.address), strategy=req.strategy,
                      pid=os.getpid(), dest=job.dest.name if job.dest else None,
                      dest_address=str(job.dest.address) if job.dest else None, uri=job.uri,
                      request={k: getattr(req, k) for k in REQUEST}, before=before,
                      stages=tuple(st.name for st in job.work),
                      storage=next((r for r in records if isinstance(r, StorageRecord)), None),
                      unplug=next((r for r in records if isinstance(r, UnplugRecord)), None), tls=dict(job.tls),
                      phase=job.start_phase, started_at=time.time() if job.start_phase == "migrating" else 0.0))


def forget(job: MigrationJob) -> None:
    """The job's start was undone: its file goes (only one this kvmshell wrote)."""
    remove(str(job.source.address), os.getpid())


def drop(job: MigrationJob) -> None:
    """The job has ended: its file goes once it has concluded (kvmshell closing mid-way keeps it, and
    so does a migration paused in postcopy: its settings stay for the recovery, and go back after it)."""
    if job.outcome is not None and job.outcome.status != "postcopy-paused":
        remove(str(job.source.address), os.getpid())


__all__ = ["RunningFile", "checkpoint", "directory", "drop", "forget", "load", "path_for", "pid_alive", "remove", "save", "write"]
