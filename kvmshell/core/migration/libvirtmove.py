"""Live migration of a libvirt guest through libvirt's API, steered by kvmshell.

libvirt moves the domain (its XML, the destination QEMU it starts, the stream, the end on both
sides), so that libvirt's view stays right; kvmshell's ``MigrationJob`` runs on top as for any guest:
it samples the migration (libvirt's job statistics), feeds the model and the live view, and its
strategy steers through the source's monitor, which maps every lever to libvirt's calls
(``LibvirtMonitor``: max downtime, max speed, postcopy, abort). The stall watchdog aborts libvirt's
job: the source runs on, and the message says what libvirt has where (`virsh list` on both).

The steps: ``check`` (nothing changes: the guest is a libvirt guest, the destination's daemon
answers, has no domain of that name and is another host; a transient domain cannot be made
persistent; ``--copy-storage`` goes in TLS or with ``--insecure-storage``: libvirt's NBD server
takes the disks in plain TCP otherwise), then ``migrate_libvirt`` (with ``--copy-storage``, the
destination's images first: ``libvirtdisk``; the plan on the monitor, the job's prepare, start and
run; if it fails, the images kvmshell created are removed once libvirt's call returned). On success
the destination domain joins the fleet as ``NAME`` (default GUEST.HOST).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from kvmshell.core.migration.live.job import MigrationJob
from kvmshell.core.migration.live.request import MigrationOutcome, MigrationRequest
from kvmshell.core.monitor.fleet import Fleet
from kvmshell.core.monitor.libvirt import LibvirtMigrationPlan, LibvirtMonitor
from kvmshell.core.monitor.libvirtconn import describe_domain, destination_facts
from kvmshell.core.monitor.libvirtdisk import (
    CopiedDisk, create_destination_images, remove_destination_images, source_disks,
)
from kvmshell.core.values.address import Address, Protocol
from kvmshell.errors import CommandFailed, KvmError, Refused


@dataclass(frozen=True)
class LibvirtMoveRequest:
    guest: str                        # the fleet's name of the source (a libvirt guest)
    plan: LibvirtMigrationPlan        # the destination's URI and libvirt's choices
    job: MigrationRequest             # strategy and limits (uri is filled in here)
    to: str                           # how the user named the destination (HOST or the URI)
    new_name: str | None = None       # the destination's name in kvmshell
    insecure_storage: bool = False    # copy_storage without TLS: the user accepts libvirt's plain NBD


@dataclass
class LibvirtMoveResult:
    guest: str
    domain: str
    new_name: str | None              # attached under this name, after success
    outcome: MigrationOutcome
    source_where: str                 # "SOURCE-URI: STATE" as libvirt has it after the migration
    dest_where: str
    decisions: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.outcome.ok


def source_monitor(fleet: Fleet, guest: str) -> LibvirtMonitor:
    mon = fleet.monitor(guest)
    if not isinstance(mon, LibvirtMonitor):
        raise CommandFailed("this guest is not a libvirt guest", guest=guest)
    return mon


async def check(fleet: Fleet, req: LibvirtMoveRequest) -> tuple[LibvirtMonitor, str]:
    """The source's monitor and its domain name, once nothing stands in the way; changes nothing."""
    mon = source_monitor(fleet, req.guest)
    if req.plan.copy_storage and not req.plan.tls and not req.insecure_storage:
        raise Refused(f"--copy-storage to {req.to} without --tls: libvirt's NBD server there would take the disks "
                      "in plain TCP (anyone who reaches its port can write them); add --tls libvirt (the daemons' "
                      "migration TLS, qemu.conf), or --insecure-storage to accept that; nothing was changed",
                      guest=req.guest)
    facts = await mon.domain_facts()
    domain = str(facts["name"])
    if not facts["persistent"]:
        for on, flag in ((req.plan.persistent, "--persistent"), (req.plan.undefine_source, "--undefine-source")):
            if on:
                raise Refused(f"{flag}: {domain} is a transient domain (libvirt has no definition of it to carry "
                              f"or undefine): drop {flag}, or `virsh define` it first; nothing was changed",
                              guest=req.guest)
    dest = await asyncio.to_thread(destination_facts, req.plan.uri, domain)
    if dest["has_domain"]:
        raise Refused(f"{req.to} ({req.plan.uri}) has a domain {domain} already: undefine it there first; "
                      "nothing was changed", guest=req.guest)
    if dest["host_uuid"] == facts["host_uuid"]:
        raise Refused(f"{req.to} ({req.plan.uri}) is the host {domain} runs on (libvirt host UUID "
                      f"{dest['host_uuid']}); nothing was changed", guest=req.guest)
    return mon, domain


async def disks_to_copy(mon: LibvirtMonitor, req: LibvirtMoveRequest) -> list[CopiedDisk]:
    """With --copy-storage, the disks libvirt copies; Refused when one cannot be (changes nothing)."""
    if not req.plan.copy_storage:
        return []
    disks, problems = await source_disks(mon)
    if problems:
        raise Refused("--copy-storage: " + "; ".join(problems) + "; nothing was changed", guest=req.guest)
    return disks


async def remove_created(req: LibvirtMoveRequest, created: list[str]) -> str:
    """Remove the images kvmshell created on the destination for a migration that failed; what it says."""
    left = await asyncio.to_thread(remove_destination_images, req.plan.uri, created)
    if left:
        return f"could not remove images kvmshell created on {req.to}: {', '.join(left)}: remove them there"
    return f"removed the images kvmshell had created on {req.to}: {', '.join(created)}"


async def remove_unused(req: LibvirtMoveRequest, domain: str, created: list[str]) -> None:
    """After an error of kvmshell's own: remove the images it created unless libvirt runs the domain there."""
    try:
        if not (await asyncio.to_thread(destination_facts, req.plan.uri, domain))["has_domain"]:
            await asyncio.to_thread(remove_destination_images, req.plan.uri, created)
    except KvmError:
        pass


async def migrate_libvirt(fleet: Fleet, req: LibvirtMoveRequest, *,
                          on_job: Callable[[MigrationJob], None] = lambda job: None,
                          progress: Callable[[str], None] = lambda message: None) -> LibvirtMoveResult:
    """Check, then migrate through libvirt with kvmshell's job on top; the result says where libvirt
    left the domain on both sides (also after a failure)."""
    mon, domain = await check(fleet, req)
    disks = await disks_to_copy(mon, req)
    created: list[str] = []
    if disks:
        try:
            created, existing = await asyncio.to_thread(create_destination_images, req.plan.uri, disks,
                                                        req.plan.copy_storage == "inc")
        except KvmError as e:
            raise e.for_guest(req.guest) from None
        for path in created:
            progress(f"created {next(d for d in disks if d.path == path).describe()} on {req.to} for libvirt "
                     "to copy into")
        for path in existing:
            progress(f"{path} is on {req.to} already (same format and size): libvirt copies onto it")
    progress(f"migrating {domain} through libvirt to {req.to} ({req.plan.uri})")
    try:
        mon.plan_migration(req.plan)
        jreq = replace(req.job, source=req.guest, dest=None, uri=req.plan.uri, listen_uri=None, tls=None)
        job = MigrationJob(mon, None, jreq, hosts=fleet.hosts, publish=fleet.publish)
        on_job(job)
        await job.prepare()
        await job.start()
        outcome = await job.run()
        ended = await mon.migration_ended()
    except BaseException:
        if created:
            await asyncio.shield(remove_unused(req, domain, created))
        raise
    if ended.error and not outcome.ok and ended.error not in outcome.message:
        outcome.notes.append(ended.error)
    if created and not outcome.ok:
        outcome.notes.append(await remove_created(req, created))
    source_uri = mon.address.uri
    src_where, dst_where = await asyncio.gather(asyncio.to_thread(describe_domain, source_uri, domain),
                                                asyncio.to_thread(describe_domain, req.plan.uri, domain))
    new_name = None
    if outcome.ok:
        mon.migrated_away(f"migrated to {req.to} through libvirt")
        new_name = req.new_name or f"{req.guest}.{req.to}"
        address = Address.libvirt(domain, req.plan.uri)
        if new_name not in fleet and address.protocol is Protocol.LIBVIRT:
            try:
                fleet.add(new_name, address)
            except KvmError:
                new_name = None
    return LibvirtMoveResult(req.guest, domain, new_name, outcome, f"{source_uri or 'default'}: {src_where}",
                             f"{req.plan.uri}: {dst_where}", list(outcome.decisions))
