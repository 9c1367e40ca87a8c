"""What a libvirt migration is made of: the plan (libvirt's choices), the flags and typed parameters
it starts with, and libvirt's job statistics read as kvmshell's ``MigrationInfo``. Used by
``libvirt.LibvirtMonitor`` (the one module that imports libvirt: the binding is passed in here)."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from kvmshell.core.values.models import DiskStats, MigrationInfo, MigrationStatus, ParamValue, RamStats


@dataclass(frozen=True)
class LibvirtMigrationPlan:
    """How libvirt is to migrate the domain: ``uri`` the destination's libvirt URI; ``address`` where
    QEMU's stream goes (``tcp://ADDR``; None: the destination's host name); the rest are libvirt's
    VIR_MIGRATE_* choices. Capabilities and parameters set before the start add to it."""

    uri: str
    address: str | None = None
    p2p: bool = False                 # the source's daemon reaches the destination's itself
    persistent: bool = False          # PERSIST_DEST
    undefine_source: bool = False     # UNDEFINE_SOURCE
    unsafe: bool = False              # UNSAFE: shared storage libvirt cannot recognise as shared
    tls: bool = False                 # TLS: libvirt's migrate_tls setup in qemu.conf
    copy_storage: str | None = None   # all | inc: NON_SHARED_DISK | NON_SHARED_INC (NBD)


FLAG_OF_CAP = {"postcopy-ram": "VIR_MIGRATE_POSTCOPY", "auto-converge": "VIR_MIGRATE_AUTO_CONVERGE",
                "compress": "VIR_MIGRATE_COMPRESSED"}
PARAM_OF = {"cpu-throttle-initial": "VIR_MIGRATE_PARAM_AUTO_CONVERGE_INITIAL",
             "cpu-throttle-increment": "VIR_MIGRATE_PARAM_AUTO_CONVERGE_INCREMENT"}


def stats_info(stats: Mapping[str, Any], status: MigrationStatus, error: str | None = None) -> MigrationInfo:
    """libvirt's job statistics as the ``MigrationInfo`` query-migrate would give."""
    def n(key: str) -> int:
        return int(stats.get(key) or 0)
    ram = RamStats(transferred=n("memory_processed"), remaining=n("memory_remaining"), total=n("memory_total"),
                   duplicate=n("memory_constant"), normal=n("memory_normal"), normal_bytes=n("memory_normal_bytes"),
                   dirty_pages_rate=n("memory_dirty_rate"), mbps=n("memory_bps") * 8 / 1e6,
                   dirty_sync_count=n("memory_iteration"), page_size=n("memory_page_size") or 4096,
                   postcopy_requests=n("memory_postcopy_requests"))
    disk = DiskStats(n("disk_processed"), n("disk_remaining"), n("disk_total")) if n("disk_total") else None
    return MigrationInfo(status, ram=ram, disk=disk, total_time_ms=n("time_elapsed") or None,
                         downtime_ms=stats.get("downtime") if status is MigrationStatus.COMPLETED else None,
                         setup_time_ms=stats.get("setup_time"), cpu_throttle_percentage=n("auto_converge_throttle"),
                         error=error)


def job_status(qemu_status: str, stats: Mapping[str, Any]) -> MigrationStatus:
    """The status of libvirt's running migration job, from its statistics and QEMU's last MIGRATION
    event: setup while QEMU has said nothing else and nothing has moved (libvirt prepares the
    destination: starts its QEMU there, which takes seconds); postcopy as QEMU says; otherwise active
    (libvirt does its own switch-over: pre-switchover and device are active here)."""
    moved = int(stats.get("memory_processed") or 0) or int(stats.get("disk_processed") or 0)
    status = MigrationStatus(qemu_status)
    if status is MigrationStatus.SETUP and not moved:
        return MigrationStatus.SETUP
    return status if status.is_postcopy else MigrationStatus.ACTIVE


ABORT_WAIT_S = 10.0
"""How long kvmshell waits for libvirt's migration call to return after abortJob. libvirt returns at
once when only RAM moves; with --copy-storage it first cancels QEMU's disk mirrors (block-job-cancel
force), and QEMU ends a mirror only once its NBD writes in flight are answered: on a link gone
silent, not before TCP gives up (tcp_retries2: up to ~15 min) or the link is back (measured: the
mirror ended the moment the link returned, 40 s after the cut)."""


def still_cancelling(waited: float, disk_remaining: int | None, *, preparing: bool = False) -> str:
    """What kvmshell says when libvirt's call did not return within ``waited`` s of abortJob (sent while
    libvirt was still ``preparing`` the destination, or during the transfer)."""
    if preparing:
        why = "libvirt ends it once the destination's preparation returns (its QEMU started, or failed to)"
    else:
        mirror = f" ({disk_remaining >> 20} MiB of the disks still to copy)" if disk_remaining else ""
        why = (f"it waits for QEMU to cancel the disk copy{mirror}, whose NBD writes hang on the stalled link until "
               "TCP gives up (up to ~15 min) or the link is back")
    return (f"libvirt: abortJob sent, and libvirt's migration job did not end within {waited:g} s: {why}; the "
            "domain keeps running on the source, and libvirt ends the job (and the destination's incoming "
            "domain) by itself")


@dataclass
class Migration:
    """One migration libvirt runs for this monitor."""

    plan: LibvirtMigrationPlan
    flags: int
    params: dict[str, Any]
    downtime_ms: int | None
    started: float = 0.0
    task: asyncio.Future[Any] | None = None
    qemu_status: str = "setup"                 # from QEMU's MIGRATION events
    last: MigrationInfo | None = None          # the last statistics read
    final: MigrationInfo | None = None         # once libvirt's call returned (or kvmshell gave up on it)
    aborted: bool = False
    bound: asyncio.Future[None] | None = None  # the wait on libvirt's call after abortJob
    stats_call: asyncio.Future[Any] | None = None   # the jobStats call in flight


def start_arguments(libvirt: ModuleType, plan: LibvirtMigrationPlan, caps: Mapping[str, bool],
                    values: Mapping[str, ParamValue]) -> tuple[int, dict[str, Any]]:
    """libvirt's flags and typed parameters for ``plan`` with the capabilities and parameters set before it."""
    flags = libvirt.VIR_MIGRATE_LIVE
    for on, flag in ((plan.p2p, "VIR_MIGRATE_PEER2PEER"), (plan.persistent, "VIR_MIGRATE_PERSIST_DEST"),
                     (plan.undefine_source, "VIR_MIGRATE_UNDEFINE_SOURCE"), (plan.unsafe, "VIR_MIGRATE_UNSAFE"),
                     (plan.tls, "VIR_MIGRATE_TLS"), (plan.copy_storage == "all", "VIR_MIGRATE_NON_SHARED_DISK"),
                     (plan.copy_storage == "inc", "VIR_MIGRATE_NON_SHARED_INC")):
        if on:
            flags |= getattr(libvirt, flag)
    for cap, flag in FLAG_OF_CAP.items():
        if caps.get(cap):
            flags |= getattr(libvirt, flag)
    params: dict[str, Any] = {}
    if plan.address:
        params[libvirt.VIR_MIGRATE_PARAM_URI] = f"tcp://{plan.address}"
    bandwidth = values.get("max-bandwidth")
    if isinstance(bandwidth, int) and bandwidth > 0:
        params[libvirt.VIR_MIGRATE_PARAM_BANDWIDTH] = max(1, bandwidth >> 20)        # MiB/s
    if caps.get("auto-converge"):
        for name, key in PARAM_OF.items():
            if isinstance(values.get(name), int):
                params[getattr(libvirt, key)] = int(values[name])
    return flags, params
