"""Migration without shared storage: `migrate --to DEST --copy-storage all|inc`.

A stage (see ``stages``) that copies the source's disks into the destination's own images over NBD
while RAM migrates, the way libvirt does it:

``prepare``        the source's writable disks are matched, by drive id (or qdev id), with the
                   destination's (same virtual size; for ``inc`` the same backing file), then the
                   destination exports each one writable on an NBD server (a unix socket in a private
                   directory when both guests are here; else TCP on the migration URI's host, at a port
                   free on the destination's host). Every check comes first: a mismatch refuses before
                   anything is started. Across hosts the export is writable by whoever reaches the
                   port, so it needs the migration's TLS (``--tls``: the NBD server and the source's
                   client use the same tls-creds-x509 objects, and tls-authz when given), or the user's
                   explicit ``--insecure-storage``; else it is refused.
``before_start``   the source opens an NBD client node per export and mirrors each disk into it
                   (``sync: full`` for all, ``top`` for inc, ``copy-mode: write-blocking`` so the
                   guest's writes reach the destination synchronously), until every job is ready.
``at_switchover``  (the source's vCPUs are stopped) each mirror is cancelled, which for a ready
                   mirror completes it with a consistent copy.
``finish``         the client nodes go, the NBD server stops; after a failure the mirror jobs are
                   cancelled first. The source's own images are never written.

Everything goes through the monitors' typed block actions, which need QMP on both guests (HMP has no
blockdev-mirror). Commands are chosen from what each QEMU offers (``blockdev-mirror`` or ``drive-mirror``
here; ``block-export-add`` or ``nbd-server-add`` in the monitor).
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from kvmshell.core.hosts.processes import free_port
from kvmshell.core.hosts.shell import HostShell
from kvmshell.core.values.units import human_bytes
from kvmshell.core.values.uri import parse_uri
from kvmshell.core.migration.live import running
from kvmshell.core.migration.live.endpoints import same_host
from kvmshell.core.migration.live.resume import DiskCopy, StorageRecord
from kvmshell.core.migration.live.stages import BaseStage
from kvmshell.core.migration.tls import AUTHZ_ID, OBJECT_ID, TlsSetup
from kvmshell.core.values.models import BlockDevice, BlockImage, BlockJob, Event, NbdServer
from kvmshell.core.monitor.base import Monitor
from kvmshell.errors import CommandFailed, KvmError, Refused, Unsupported

if TYPE_CHECKING:
    from kvmshell.core.migration.live.job import MigrationJob
    from kvmshell.core.migration.live.request import MigrationOutcome

log = logging.getLogger(__name__)

MODES = ("all", "inc")


def can_mirror(mon: Monitor) -> bool:
    """The guest's monitor offers the block mirror and NBD commands the disk copy needs (QMP does; HMP
    has no NBD export)."""
    return mon.features.has_qmp("nbd-server-start") and (
        mon.features.has_qmp("blockdev-mirror") or mon.features.has_qmp("drive-mirror"))
POLL_S = 0.5                 # the block jobs are read this often while the mirrors run (events wake us sooner)
RATE_WINDOW_S = 1.0          # the guest's write rate to a disk is measured over this
MIRROR_BUFFER = 16 << 20     # QEMU's default buf-size of a mirror job
SWITCHOVER_TIMEOUT_S = 60.0  # the guest is stopped: the last dirty blocks must go within this
JOB_EVENTS = ("BLOCK_JOB_READY", "BLOCK_JOB_COMPLETED", "BLOCK_JOB_CANCELLED", "BLOCK_JOB_ERROR")


@dataclass
class Disk:
    """One disk copied from the source to the destination, and its mirror's state."""

    key: str                 # drive id (or qdev id): the same on both guests
    source_node: str         # what the mirror reads (the source's root node)
    dest_node: str           # what the destination exports
    size: int                # virtual size, bytes
    index: int
    offset: int = 0          # query-block-jobs: bytes copied
    length: int = 0          # ... of this many (grows as the guest writes)
    busy: bool = False
    ready: bool = False
    ended: str | None = None     # completed / cancelled / failed: ...
    error: str | None = None
    written_rate: float | None = None    # bytes/s the guest writes to this disk (from ``length``)
    _seen: tuple[float, int] | None = None

    @property
    def export(self) -> str:
        return f"kvmshell-{self.index}"

    @property
    def client_node(self) -> str:
        return f"kvmshell-nbd-{self.index}"

    @property
    def job_id(self) -> str:
        return f"kvmshell-mirror-{self.index}"

    def update(self, job: BlockJob, now: float) -> None:
        self.offset, length = job.offset, job.length
        if self._seen is None:
            self._seen = (now, length)
        elif now - self._seen[0] >= RATE_WINDOW_S:          # len grows by what the guest writes
            self.written_rate = max(0, length - self._seen[1]) / (now - self._seen[0])
            self._seen = (now, length)
        self.length = length
        self.busy = job.busy
        self.ready = self.ready or job.ready

    def line(self) -> tuple[str, Any]:
        total = self.length or self.size
        done = f"{human_bytes(self.offset)} / {human_bytes(total)}"
        if self.ended is not None:
            return (f"disk {self.key}", f"{self.ended}, {done}")
        pct = 100 * self.offset / total if total else 0
        state = "ready (in sync)" if self.ready else "copying" if self.busy else "copying (paced)"
        left = human_bytes(max(0, self.length - self.offset))
        text = f"{state}: {done} ({pct:.0f} %), {left} {'dirty' if self.ready else 'left'}"
        if self.written_rate:
            text += f", guest writes {human_bytes(self.written_rate)}/s"
        return (f"disk {self.key}", text)


async def block_devices(mon: Monitor) -> dict[str, BlockDevice]:
    """Every device with a medium, by drive id (or qdev id)."""
    return {d.key: d for d in await mon.block_devices() if d.image is not None and d.key}


def writable_disks(devices: dict[str, BlockDevice]) -> dict[str, BlockDevice]:
    """The disks worth copying: a file behind them, not read-only (no CD-ROM, no empty drive)."""
    return {k: d for k, d in devices.items() if d.writable and d.image is not None and d.image.filename}


def _size(dev: BlockDevice) -> int:
    assert dev.image is not None          # block_devices: a medium is in
    return dev.image.virtual_size


def _backing(dev: BlockDevice) -> BlockImage | None:
    return dev.backing[0] if dev.backing else None


class StorageStage(BaseStage):
    """Copy every writable disk to the destination over NBD while RAM migrates."""

    name = "storage"
    pause_before_switchover = True

    def __init__(self, mode: str, *, tcp: tuple[str, int] | None = None, check_backing: bool = True,
                 insecure: bool = False) -> None:
        """``tcp``: where the destination's NBD server listens and the source connects; by default
        a unix socket when both guests are here, else the migration URI's host (``_tcp_beside``).
        ``check_backing``: for inc across hosts, compare the backing files' sha256 (the caller may
        have done it already). ``insecure``: across hosts without TLS, export the disks anyway
        (``--insecure-storage``)."""
        super().__init__()
        self.check_backing = check_backing
        self.insecure = insecure
        self._tls: TlsSetup | None = None              # the migration's TLS: the NBD server and client use it
        if mode not in MODES:
            raise ValueError(mode)
        self.mode = mode
        self.tcp = tcp
        self.disks: list[Disk] = []
        self._src: Monitor | None = None
        self._dst: Monitor | None = None
        self._src_name = self._dst_name = ""
        self._sock_dir: str | None = None
        self._one_host = False                         # both QEMUs on one host: a shared file is possible
        self._server: NbdServer | None = None          # where the destination's NBD server listens
        self._starting_server: NbdServer | None = None # in the state file before nbd-server-start is sent
        self._resumed = False                          # rebuilt from a state file (``resumed``)
        self._clients: list[str] = []                  # NBD client nodes on the source
        self._jobs: list[str] = []                     # mirror job ids started
        self._blockdev = True                          # blockdev-add + blockdev-mirror (else drive-mirror)
        self._mirror_args: set[str] = set()
        self._changed = asyncio.Event()
        self._stop = asyncio.Event()                   # ends the poller
        self._unsubscribe: Callable[[], None] | None = None
        self._poller: asyncio.Task[None] | None = None

    # -- prepare: check everything, then export the destination's disks -------------------------
    async def prepare(self, job: MigrationJob) -> None:
        if job.dest is None or job.req.dest is None:
            raise CommandFailed("--copy-storage needs a destination guest (--to DEST)", guest=job.req.source)
        src, dst = self._src, self._dst = job.source, job.dest
        self._src_name, self._dst_name = job.req.source, job.req.dest
        for mon in (src, dst):
            if not can_mirror(mon):
                raise Refused(f"--copy-storage needs a QMP monitor on both guests ({mon.name} speaks HMP)",
                              guest=self._src_name)
        self._tls = job.req.tls
        self._one_host = same_host(job.hosts, src.address, dst.address)
        if not self._one_host and self._tls is None and not self.insecure:
            raise Refused(f"--copy-storage to {self._dst_name} on another host without --tls: its NBD server "
                          "would let anyone who reaches the port write the disks; add --tls DIR (certificates "
                          "from `kvmshell tls-init`), or --insecure-storage to accept that. Nothing was started",
                          guest=self._src_name)
        where = self.tcp if self.tcp is not None else await self._tcp_beside(job)
        self._check_commands(src, dst)
        if self._tls is not None and where is not None and not self._blockdev:
            raise Unsupported("--copy-storage with --tls needs blockdev-mirror on the source (drive-mirror "
                              "has no TLS): drop --tls, or use a newer QEMU", guest=self._src_name)
        ours = writable_disks(await block_devices(src))
        theirs = await block_devices(dst)
        if not ours:
            raise Refused("--copy-storage: this guest has no writable disk to copy", guest=self._src_name)
        problems = [p for key, dev in ours.items() if (p := self._mismatch(key, dev, theirs.get(key)))]
        if problems:
            raise Refused("--copy-storage: " + "; ".join(problems) + f". Nothing was started; {self._src_name} "
                          "runs on as before", guest=self._src_name)
        if self.mode == "inc" and self.check_backing and (src.address.ssh or dst.address.ssh):
            if not same_host(job.hosts, src.address, dst.address):
                await self._same_files_there(job, [b.filename for dev in ours.values() for b in dev.backing])
        for i, (key, dev) in enumerate(ours.items()):
            self.disks.append(Disk(key, dev.node_name, theirs[key].node_name, _size(dev), i))
        self._mirror_args = set(await src.command_args("blockdev-mirror" if self._blockdev else "drive-mirror"))
        await self._start_server(job, dst, where)
        for disk in self.disks:
            await dst.nbd_export(disk.dest_node, disk.export, writable=True)
        self.notes.append(f"storage: {dst.name} exported {', '.join(d.key for d in self.disks)} over NBD "
                          f"({self._where()})")

    def _check_commands(self, src: Monitor, dst: Monitor) -> None:
        f, g = src.features, dst.features
        self._blockdev = f.has_qmp("blockdev-add") and f.has_qmp("blockdev-mirror") and f.has_qmp("blockdev-del")
        if not (self._blockdev or f.has_qmp("drive-mirror")):
            raise Unsupported("--copy-storage: this QEMU has neither blockdev-mirror nor drive-mirror",
                              guest=src.name)
        if not g.has_qmp("nbd-server-start") or not (g.has_qmp("block-export-add") or g.has_qmp("nbd-server-add")):
            raise Unsupported(f"--copy-storage: {dst.name}'s QEMU has no NBD server (nbd-server-start, "
                              "block-export-add)", guest=src.name)

    def _mismatch(self, key: str, dev: BlockDevice, theirs: BlockDevice | None) -> str | None:
        """Why ``dev`` cannot be copied into the destination's ``theirs`` (None: it can)."""
        size = _size(dev)
        want = f"start {self._dst_name} with a disk of id {key} and {human_bytes(size)} ({size} bytes)"
        if theirs is None:
            return f"{self._dst_name} has no disk {key}: {want}"
        file = theirs.image.filename if theirs.image is not None else ""
        if self._one_host and file and dev.image is not None and file == dev.image.filename:
            return (f"{self._dst_name}'s disk {key} is the very file the source uses ({file}): that is shared "
                    "storage, nothing to copy; drop --copy-storage (copying a disk onto itself would corrupt it)")
        if not theirs.writable:
            return f"{self._dst_name}'s disk {key} is read-only"
        other = _size(theirs)
        if other != size:
            return (f"{self._dst_name}'s disk {key} has {human_bytes(other)} ({other} bytes), the source's "
                    f"{human_bytes(size)} ({size} bytes): {want}")
        if self.mode != "inc":
            return None
        ours, back = _backing(dev), _backing(theirs)
        if ours is None:
            return f"disk {key} has no backing file: copy it whole with --copy-storage all"
        if back is None:
            return (f"{self._dst_name}'s disk {key} has no backing file; for inc it must be a new top image "
                    f"over {ours.filename} (qemu-img create -f qcow2 -F {ours.format} "
                    f"-b {ours.filename} TOP)")
        for what, field in (("filename", "filename"), ("format", "format"), ("virtual-size", "virtual_size")):
            here, there = getattr(ours, field), getattr(back, field)
            if here != there:
                return (f"disk {key}: the backing files differ ({what}: {here} here, "
                        f"{there} on {self._dst_name}); inc needs the same backing file on both")
        return None

    async def _same_files_there(self, job: MigrationJob, paths: list[str]) -> None:
        """inc across hosts: each backing file at the same path on DEST's host, same size and sha256."""
        assert job.dest is not None
        pool, a, b = job.hosts, job.source.address.ssh, job.dest.address.ssh
        here = HostShell(pool if a else None, a)
        there = HostShell(pool if b else None, b)
        try:
            mine, theirs = await asyncio.gather(here.sizes(paths), there.sizes(paths))
            for p in dict.fromkeys(paths):
                if theirs.get(p) is None or theirs.get(p) != mine.get(p):
                    found = f"has {theirs[p]} bytes, {mine.get(p)} here" if p in theirs else "is missing"
                    raise Refused(f"--copy-storage inc: the backing file {p} on {self._dst_name}'s host {found}: "
                                  "inc needs the same file on both hosts (or use --copy-storage all)",
                                  guest=self._src_name)
                x, y = await asyncio.gather(here.sha256(p, size=mine[p]), there.sha256(p, size=theirs[p]))
                if x != y:
                    raise Refused(f"--copy-storage inc: the backing file {p} differs on {self._dst_name}'s host "
                                  f"(sha256 {y[:12]}... there, {x[:12]}... here)", guest=self._src_name)
        finally:
            await asyncio.gather(here.aclose(), there.aclose())
        self.notes.append(f"storage: {len(set(paths))} backing file(s) checked on {self._dst_name}'s host (sha256)")

    async def _tcp_beside(self, job: MigrationJob) -> tuple[str, int] | None:
        """Where the NBD server listens: None for a unix socket (both guests here); else the host of the
        migration URI (where the source reaches the destination) and a free port on DEST's host."""
        assert job.dest is not None
        src, dst = job.source.address, job.dest.address
        if src.ssh is None and dst.ssh is None:
            return None
        uri = parse_uri(job.uri)
        if uri is None or not uri.tcp or uri.host is None:
            raise Refused(f"--copy-storage: the guests are not both on this host and the migration URI "
                          f"{job.uri} is not tcp:HOST:PORT: kvmshell cannot tell where the source reaches "
                          f"{self._dst_name}", guest=self._src_name)
        port = await free_port(job.hosts, dst.ssh)
        if job.req.tls is None and uri.host not in ("127.0.0.1", "localhost", "::1"):
            self.warnings.append(f"the disks go to {self._dst_name} over NBD in plain TCP ({uri.host}:{port}): "
                                 "anyone on the path can read and change them")
        return uri.host, port

    def _where(self) -> str:
        return "no server" if self._server is None else str(self._server)

    def _announce(self, job: MigrationJob, server: NbdServer) -> None:
        """The server in the state file before it is started (a kvmshell that adopts stops it)."""
        self._starting_server = server
        running.checkpoint(job)

    async def _start_server(self, job: MigrationJob, dst: Monitor, where: tuple[str, int] | None) -> None:
        if where is None:
            self._sock_dir = tempfile.mkdtemp(prefix="kvmshell-nbd-")
            path = os.path.join(self._sock_dir, "nbd.sock")
            try:
                server = NbdServer(path=path)
                self._announce(job, server)
                await dst.nbd_server_start(server)
                self._server = server
                return
            except CommandFailed as e:    # e.g. a QEMU running as another user cannot bind there
                log.info("%s: NBD on a unix socket failed (%s); using TCP on 127.0.0.1", dst.name, e)
                self._drop_sock_dir()
        host, port = where or ("127.0.0.1", await free_port(None, None))
        tls = self._tls if where is not None else None
        server = NbdServer(host=host, port=port) if tls is None else \
            NbdServer(host=host, port=port, tls_creds=OBJECT_ID, tls_authz=AUTHZ_ID if tls.authz else None,
                      tls_hostname=tls.hostname)
        self._announce(job, server)
        await dst.nbd_server_start(server)
        self._server = server

    # -- before_start: mirror every disk until all are ready -------------------------------------
    async def before_start(self, job: MigrationJob) -> None:
        src = job.source
        speed = job.req.bandwidth // len(self.disks) if job.req.bandwidth else 0
        if self._resumed:                 # a dead kvmshell's start: its mirrors run on; start those it had not
            running_jobs = {j.id for j in await src.block_jobs()}
            missing = [d for d in self.disks if d.job_id not in running_jobs]
            if missing:
                self._mirror_args = set(await src.command_args("blockdev-mirror" if self._blockdev else "drive-mirror"))
                if self._blockdev:       # recorded before its command: kvmshell may have died before QEMU made it
                    present = set(await src.block_nodes())
                    self._clients = [c for c in self._clients if c in present]
            for disk in missing:
                self._jobs = [j for j in self._jobs if j != disk.job_id]
                await self._mirror(job, src, disk, speed)
        else:
            self._unsubscribe = src.subscribe(self._on_event)
            for disk in self.disks:
                await self._mirror(job, src, disk, speed)
            self._watch()
        # a capped mirror copies a buffer (up to 16 MiB) at once, then sleeps: allow for that pause
        stall = max(job.req.stall_timeout, 2 * MIRROR_BUFFER / speed) if speed else job.req.stall_timeout
        await self._wait(lambda: all(d.ready for d in self.disks), stall_s=stall,
                         what="the disk copy")
        self.notes.append(f"storage: {len(self.disks)} disk(s) in sync on {self._dst_name} "
                          f"({', '.join(f'{d.key} {human_bytes(d.size)}' for d in self.disks)})")

    async def _mirror(self, job: MigrationJob, src: Monitor, disk: Disk, speed: int) -> None:
        """Mirror ``disk``; the state file says so after each change on the source."""
        sync = "full" if self.mode == "all" else "top"
        blocking = "copy-mode" in self._mirror_args
        assert self._server is not None
        if self._blockdev:
            if disk.client_node not in self._clients:
                await self._made(job, self._clients, disk.client_node,
                                 src.blockdev_add_nbd(disk.client_node, self._server, disk.export))
            await self._made(job, self._jobs, disk.job_id, src.blockdev_mirror(
                disk.job_id, disk.source_node, disk.client_node, sync=sync, speed=speed, write_blocking=blocking))
        else:
            await self._made(job, self._jobs, disk.job_id, src.drive_mirror(
                disk.job_id, disk.source_node, self._server.uri(disk.export), target_format="raw", sync=sync,
                speed=speed, write_blocking=blocking))

    @staticmethod
    async def _made(job: MigrationJob, made: list[str], name: str, command: Awaitable[None]) -> None:
        """Send ``command``, which makes ``name`` on the source, recorded in ``made`` (and the state file)
        before it is sent: a cancel can land after QEMU made it and before its answer arrives, and the
        undo must still remove it (it removes what is there)."""
        made.append(name)
        running.checkpoint(job)
        try:
            await command
        except CommandFailed:             # QEMU refused: nothing was made
            made.remove(name)
            running.checkpoint(job)
            raise

    def _watch(self) -> None:
        self._poller = asyncio.create_task(self._poll(), name=f"storage-poll-{self._src_name}")

    # -- in the state file, and back in the kvmshell that adopts the migration ---------------------
    def record(self) -> StorageRecord | None:
        server = self._server or self._starting_server
        if server is None:
            return None
        return StorageRecord(self.mode, self._dst_name, server,
                             tuple(DiskCopy(d.key, d.source_node, d.dest_node, d.size, d.index) for d in self.disks),
                             tuple(self._jobs), tuple(self._clients), self._blockdev, self._sock_dir,
                             self.pause_before_switchover)

    @classmethod
    def resumed(cls, rec: StorageRecord, source: Monitor, dest: Monitor | None) -> StorageStage:
        """The stage of the kvmshell that started the migration, from its record: the mirrors run on in
        QEMU; ``at_switchover`` completes them, ``finish`` cleans up (the NBD server only when ``dest``
        is attached here). A start it had not finished goes on in ``before_start`` (the mirrors not
        started yet are started, then all are waited for)."""
        stage = cls(rec.mode)
        stage._src, stage._dst = source, dest
        stage._src_name, stage._dst_name = source.name, dest.name if dest is not None else rec.dest
        stage._server, stage._sock_dir, stage._blockdev = rec.server, rec.sock_dir, rec.blockdev
        stage._jobs, stage._clients = list(rec.jobs), list(rec.clients)
        stage.disks = [Disk(d.key, d.source_node, d.dest_node, d.size, d.index) for d in rec.disks]
        stage.pause_before_switchover = rec.pause_before_switchover
        stage._resumed = True
        stage._unsubscribe = source.subscribe(stage._on_event)
        stage._watch()
        return stage

    def _on_event(self, ev: Event) -> None:
        if ev.name not in JOB_EVENTS:
            return
        disk = next((d for d in self.disks if d.job_id == ev.data.get("device")), None)
        if disk is None:
            return
        if "offset" in ev.data:
            disk.offset, disk.length = int(ev.data["offset"]), int(ev.data.get("len", disk.length))
        if ev.name == "BLOCK_JOB_READY":
            disk.ready = True
        elif ev.name == "BLOCK_JOB_ERROR":
            disk.error = f"{ev.data.get('operation', 'I/O')} error on {self._dst_name}'s side"
        elif ev.name == "BLOCK_JOB_COMPLETED":
            disk.ended = f"failed: {ev.data['error']}" if ev.data.get("error") else "completed"
        else:
            disk.ended = "cancelled"
        self._changed.set()

    async def _refresh(self) -> None:
        """The block jobs into the disks; a job that vanished without an event has ended."""
        if self._src is None:
            return
        jobs = {j.id: j for j in await self._src.block_jobs()}
        now = time.monotonic()
        for disk in self.disks:
            if disk.job_id in jobs:
                disk.update(jobs[disk.job_id], now)
            elif disk.job_id in self._jobs and disk.ended is None:
                disk.ended = "ended"

    async def _poll(self) -> None:
        while not self._stop.is_set():
            try:
                await self._refresh()
            except KvmError:
                return
            try:
                async with asyncio.timeout(POLL_S):
                    await self._stop.wait()
            except TimeoutError:
                pass

    async def _wait(self, done: Callable[[], bool], *, stall_s: float, what: str) -> None:
        """Until ``done()``; CommandFailed when a mirror failed or nothing moved for ``stall_s``."""
        moved = (-1, time.monotonic())
        while True:
            for disk in self.disks:
                if disk.ended not in (None, "completed") or disk.error:
                    raise CommandFailed(f"{what}: the mirror of disk {disk.key} to {self._dst_name} "
                                        f"{disk.ended or 'failed'}{f' ({disk.error})' if disk.error else ''}",
                                        guest=self._src_name)
            if done():
                return
            progress = sum(d.offset for d in self.disks)
            now = time.monotonic()
            if progress != moved[0]:
                moved = (progress, now)
            elif now - moved[1] > stall_s:
                raise CommandFailed(f"{what}: no progress for {stall_s:g} s ({human_bytes(progress)} copied): "
                                    f"{self._dst_name} or the link is stuck", guest=self._src_name)
            await self._next_change()
            await self._refresh()

    # -- at_switchover: complete every mirror while the vCPUs are stopped ------------------------
    async def at_switchover(self, job: MigrationJob) -> None:
        src = job.source
        await self._refresh()
        for disk in self.disks:
            if not disk.ready or disk.ended is not None:
                raise CommandFailed(f"the mirror of disk {disk.key} is {disk.ended or 'not in sync'}",
                                    guest=self._src_name)
        for disk in self.disks:
            await src.block_job_set_speed(disk.job_id, 0)
            await src.block_job_cancel(disk.job_id)
        await self._wait(lambda: all(d.ended is not None for d in self.disks), stall_s=SWITCHOVER_TIMEOUT_S,
                         what="completing the disk copy")

    # -- finish: clean up on both sides ------------------------------------------------------
    async def finish(self, job: MigrationJob, outcome: MigrationOutcome) -> None:
        self._drop_sock_dir()        # first: nothing needs the socket now, and a closing session may cut the rest short
        if self._poller is not None:
            self._stop.set()
            await asyncio.gather(self._poller, return_exceptions=True)
            self._poller = None
        done: list[str] = []
        mirrored = bool(self._jobs)
        if self._src is not None and not outcome.ok and mirrored:
            done += await self._cancel_migration(self._src)
        if self._src is not None:
            done += await self._clean_source(self._src)
        if self._dst is not None and self._server is not None:
            try:
                await self._dst.nbd_server_stop()
                done.append(f"NBD server on {self._dst_name} stopped")
            except KvmError as e:
                done.append(f"NBD server on {self._dst_name} not stopped ({e.message})"
                            if self._dst.connected else f"{self._dst_name} is gone, its NBD server with it")
            self._server = None
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None
        if not outcome.ok and mirrored:
            done.append(f"{self._src_name}'s own disks were only read: it runs on them as before")
        if done:
            self.notes.append("storage: " + ", ".join(done))

    @staticmethod
    async def _cancel_migration(src: Monitor) -> list[str]:
        """A migration still going when the copy is abandoned (kvmshell interrupted) must not switch
        over onto disks that are no longer copied: cancel it."""
        try:
            status = (await src.migration()).status
            if status.is_active and not status.is_postcopy:   # postcopy: copied already
                await src.migrate_cancel()
                return ["the RAM migration cancelled (its disks are no longer copied)"]
        except KvmError as e:
            return [f"could not cancel the migration ({e.message}): run migrate_cancel"]
        return []

    async def _clean_source(self, src: Monitor) -> list[str]:
        done: list[str] = []
        try:
            ours = [d.job_id for d in self.disks]
            listed = [j.id for j in await src.block_jobs() if j.id in ours]
            left = [job_id for job_id in listed if job_id in self._jobs]
            for job_id in left:
                try:
                    await src.block_job_cancel(job_id, force=True)
                except CommandFailed:    # it is ending by itself (failed, aborting): the wait below sees it go
                    pass
            if listed:                   # also a job that failed by itself and is still being torn down
                await self._gone(src, listed)
            if left:
                done.append(f"{len(left)} mirror job(s) cancelled")
            present = set(await src.block_nodes()) if self._clients else set()
            for node in list(self._clients):
                if node in present:      # a node recorded as its command was cancelled may not be there
                    await src.blockdev_del(node)
                self._clients.remove(node)
            if self._blockdev and self._jobs:
                done.append("NBD client nodes removed")
        except KvmError as e:
            done.append(f"could not clean up on {self._src_name}: {e.message}")
        except TimeoutError:
            done.append(f"mirror jobs on {self._src_name} still there after the cancel")
        self._jobs = []
        return done

    async def _gone(self, src: Monitor, job_ids: list[str], timeout: float = 30.0) -> None:
        async with asyncio.timeout(timeout):
            while any(j.id in job_ids for j in await src.block_jobs()):
                await self._next_change()

    async def _next_change(self) -> None:
        """Until a block-job event says something changed, or POLL_S at most."""
        self._changed.clear()
        try:
            async with asyncio.timeout(POLL_S):
                await self._changed.wait()
        except TimeoutError:
            pass

    def _drop_sock_dir(self) -> None:
        if self._sock_dir is not None:
            shutil.rmtree(self._sock_dir, ignore_errors=True)
            self._sock_dir = None

    # -- the live view ------------------------------------------------------------------------
    def lines(self) -> list[tuple[str, Any]]:
        return [d.line() for d in self.disks]

