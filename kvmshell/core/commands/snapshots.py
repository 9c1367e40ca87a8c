"""savevm, loadvm, delvm, info snapshots - with the safety QEMU does not give.

Measured on QEMU 7.2: a failed loadvm leaves the guest paused in restore-vm even for a tag that does
not exist; a loadvm during an outgoing migration pauses the source mid-migration; savevm with an
existing tag silently replaces it. So: check the tag first, refuse during a migration, say what
state a failed load left, and ask before replacing.
"""

from __future__ import annotations

import time
from datetime import datetime

from kvmshell.core.commands.common import refuse_during_migration
from kvmshell.core.commands.results import Done, Result, Table
from kvmshell.core.values.units import human_bytes
from kvmshell.core.commands.spec import Arg, CommandSpec, Completer, Flag
from kvmshell.core.monitor.guestdata import SNAPSHOTS, STATUS
from kvmshell.core.values.models import Snapshot
from kvmshell.core.monitor.base import Monitor
from kvmshell.core.commands.session import Invocation
from kvmshell.errors import CommandFailed, KvmError

YES = Flag(("-y", "--yes"), "do not ask for confirmation")

# QEMU's messages for a load that failed before anything was overwritten
_NOTHING_LOADED = ("does not exist", "not found", "no block device", "Device '", "is not", "read-only",
                   "cannot", "Snapshot '")


async def _tags(inv: Invocation) -> dict[str, Snapshot]:
    snaps = await inv.monitor.snapshots()
    return {s.tag: s for s in snaps}


async def savevm(inv: Invocation) -> Result:
    mon = inv.monitor
    await refuse_during_migration(inv, "savevm")
    tag = str(inv.values.get("tag") or datetime.now().strftime("vm-%Y%m%d%H%M%S"))
    existing = await _tags(inv)
    if tag in existing:
        await inv.confirm(f"snapshot {tag!r} exists (saved {_date(existing[tag])}); replace it?")
    start = time.monotonic()
    await mon.save_snapshot(tag, replace=tag in existing, progress=inv.progress)
    inv.session.data.schedule(inv.guest or "", SNAPSHOTS)
    saved = (await _tags(inv)).get(tag)
    size = f", {human_bytes(saved.vm_state_size)} of VM state" if saved else ""
    return Done(f"saved snapshot {tag!r} in {time.monotonic() - start:.1f} s{size}")


async def loadvm(inv: Invocation) -> Result:
    mon = inv.monitor
    tag = str(inv.values["tag"])
    await refuse_during_migration(inv, "loadvm")
    existing = await _tags(inv)
    if tag not in existing:
        have = ", ".join(existing) or "none"
        raise CommandFailed(f"no snapshot {tag!r} on this guest (snapshots: {have}); nothing was loaded",
                            guest=inv.guest)
    before = await mon.status()
    if before.running:
        await inv.confirm(f"loadvm {tag!r} replaces the running guest's memory and device state with "
                          f"the snapshot's (saved {_date(existing[tag])}); continue?")
    start = time.monotonic()
    try:
        await mon.load_snapshot(tag, progress=inv.progress)
    except CommandFailed as e:
        raise CommandFailed(await _after_failed_load(mon, e.message), guest=inv.guest) from None
    inv.session.data.schedule(inv.guest or "", STATUS)
    after = await mon.status()
    return Done(f"loaded snapshot {tag!r} in {time.monotonic() - start:.1f} s; the guest is {after}")


async def _after_failed_load(mon: Monitor, error: str) -> str:
    try:
        status = await mon.status()
    except KvmError:
        return f"loadvm failed: {error}; the guest's state could not be read afterwards"
    if status.running:
        return f"loadvm failed: {error}; the guest is still running"
    if any(marker in error for marker in _NOTHING_LOADED):
        return (f"loadvm failed: {error}. The guest is now paused ({status.state.value}); nothing was "
                "loaded, so `cont` resumes it as it was")
    return (f"loadvm failed: {error}. The guest is paused ({status.state.value}) and its state may be "
            "partly overwritten: do not `cont`; load another snapshot or restart the guest")


async def delvm(inv: Invocation) -> Result:
    mon = inv.monitor
    tag = str(inv.values["tag"])
    await refuse_during_migration(inv, "delvm")
    existing = await _tags(inv)
    if tag not in existing:
        raise CommandFailed(f"no snapshot {tag!r} on this guest (snapshots: {', '.join(existing) or 'none'})",
                            guest=inv.guest)
    await mon.delete_snapshot(tag, progress=inv.progress)
    inv.session.data.schedule(inv.guest or "", SNAPSHOTS)
    return Done(f"deleted snapshot {tag!r}")


async def info_snapshots(inv: Invocation) -> Result:
    snaps = await inv.monitor.snapshots()
    inv.session.data.schedule(inv.guest or "", SNAPSHOTS)
    rows = tuple((s.tag, human_bytes(s.vm_state_size), _date(s), _clock(s.vm_clock_ns)) for s in snaps)
    data = [{"id": s.id, "tag": s.tag, "vm_state_bytes": s.vm_state_size, "date_s": s.date_sec,
             "vm_clock_ns": s.vm_clock_ns} for s in snaps]
    return Table(("TAG", "VM SIZE", "DATE", "VM CLOCK"), rows, empty="no snapshots", data=data)


def _date(s: Snapshot) -> str:
    return datetime.fromtimestamp(s.date_sec).strftime("%Y-%m-%d %H:%M:%S")


def _clock(ns: int) -> str:
    sec = ns / 1e9
    return f"{int(sec // 3600):02d}:{int(sec % 3600 // 60):02d}:{sec % 60:06.3f}"



SPECS = (
    CommandSpec("savevm", "save the guest's full state (RAM, devices, disks) as a snapshot", savevm,
                args=(Arg("tag", "snapshot name (default: vm-YYYYmmddHHMMSS)", optional=True,
                          complete=Completer.SNAPSHOT_TAG),),
                flags=(YES,), maps_to="QMP snapshot-save (job) where the guest has it, else HMP savevm",
                details="Asks before replacing an existing tag (QEMU would replace it silently). "
                        "Refused while a migration of the guest runs.", category="snapshots"),
    CommandSpec("loadvm", "restore the guest to a snapshot", loadvm,
                args=(Arg("tag", "snapshot name", complete=Completer.SNAPSHOT_TAG),),
                flags=(YES,), maps_to="QMP snapshot-load (job) where the guest has it, else HMP loadvm",
                details="Checks the tag exists first (a failed load leaves the guest paused), asks before "
                        "loading over a running guest, and after a failure says whether `cont` is safe.",
                category="snapshots"),
    CommandSpec("delvm", "delete a snapshot", delvm,
                args=(Arg("tag", "snapshot name", complete=Completer.SNAPSHOT_TAG),),
                maps_to="QMP snapshot-delete (job) where the guest has it, else HMP delvm", category="snapshots"),
    CommandSpec("info snapshots", "list the snapshots present on all the guest's disks", info_snapshots,
                maps_to="QMP query-block (HMP info snapshots)", category="snapshots"),
)
