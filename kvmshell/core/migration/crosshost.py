"""Live migration to another host: `migrate GUEST --to-host HOST [--tunnel]`.

Shared storage is assumed (the seed's NFS workflow): the destination opens the very image files the
source uses, at the same paths. The steps (``CrossHostMigration``: ``preflight`` returns a frozen
``CrossHostPlan``, ``run`` carries it out), and what a failure at each leaves:

1. preflight - nothing is touched: HOST is a configured host and answers; the source's command line
   (its pid from the monitor, through ``processes.discover``, then ``/proc/PID/cmdline``); every image of
   it and of its backing chains exists on HOST at the same path with the same size (else: refused,
   saying that live migration to another host needs shared storage).
2. start the destination on HOST from the derived command line (a ``twin.Twin``: monitors and
   pidfile in a run directory, ``-incoming defer``, ``-daemonize``), and open its monitor through SSH.
3. the live-migration engine (``MigrationJob``) with that destination: both sides prepared, the
   destination listens on ``tcp:ADDR:PORT`` (ADDR: the host of HOST's ssh target, or the address
   given, which must be one of HOST's; PORT free there, picked by the preflight),
   or with ``tunnel`` on a unix socket in the run directory that kvmshell forwards a local unix socket
   to through its SSH connection (``ssh.forward.forward_local_unix``; the source must run here).
4. on success: the destination is attached to the fleet as ``GUEST.HOST`` and the source is quit
   (after confirmation).

Without shared storage (``copy_storage`` all or inc): the source's writable disks get new images on
HOST (in ``run_dir`` if given, else ``/var/lib/kvmshell/images/NAME``): ``qemu-img create`` with the
same format and size, for inc on top of the same backing file (checked there: same path, size and
sha256). The destination starts on them, and ``migration.storage.StorageStage`` copies the disks over
NBD (TCP to the address the migration stream uses) while RAM migrates. A failure removes them again.

A failure in steps 2-3 kills the destination QEMU (a source whose migration failed or was cancelled
runs on where it was) and says what was done and undone (``ledger.Ledger``). A migration that
broke in postcopy is the exception: the guest is split between the two QEMUs, and both are left alone.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shlex
import shutil
import tempfile
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace

from kvmshell.core.hosts.pool import HostPool
from kvmshell.core.hosts.processes import free_port, source_command
from kvmshell.core.hosts.shell import HostShell
from kvmshell.core.hosts.ssh.forward import LocalForward, forward_local_unix
from kvmshell.core.migration.images import absolute_images, backing_chain
from kvmshell.core.migration.ledger import Ledger
from kvmshell.core.migration.tcgdirty import tcg_dirty_check
from kvmshell.core.migration.live.endpoints import tls_between
from kvmshell.core.migration.live.job import MigrationJob
from kvmshell.core.migration.live.request import MigrationOutcome, MigrationRequest
from kvmshell.core.migration.live.stages import Stage
from kvmshell.core.migration.live.storage import StorageStage, block_devices, can_mirror, writable_disks
from kvmshell.core.migration.static import DEFAULT_DIR
from kvmshell.core.migration.twin import MAX_SOCKET_PATH, Twin, TwinPlan, socket_name, sockets_fit
from kvmshell.core.monitor.base import Monitor
from kvmshell.core.monitor.fleet import Fleet
from kvmshell.core.values.address import Address, Kind, Protocol, check_guest_name, uri_host
from kvmshell.core.values.cmdline import Option, QemuCommand, images_of, rewrite_images
from kvmshell.core.values.models import RunState
from kvmshell.errors import ConfigError, KvmError, Refused

log = logging.getLogger(__name__)

START_TIMEOUT = 60.0


class CrossHostFailed(KvmError):
    """Live migration to another host stopped; the message says what was done and undone."""

    title = "live migration failed"


@dataclass(frozen=True)
class CrossHostRequest:
    guest: str                        # fleet name of the source
    to: str                           # [hosts.NAME] of the destination
    job: MigrationRequest             # strategy and limits (source/dest/uri are filled in here)
    tunnel: bool = False
    run_dir: str | None = None        # on HOST: sockets, pidfile, log (default /run/kvmshell/NAME)
    new_name: str | None = None       # default GUEST.HOST
    address: str | None = None        # where the source reaches HOST (default: the host of its ssh target)
    copy_storage: str | None = None   # no shared storage: all | inc (new images on HOST, copied over NBD)
    tls_root: str | None = None       # encrypt the stream: certificates `kvmshell tls-init DIR HOST...` wrote
    tls_authz: bool = False           # and admit only the source host's client certificate
    insecure_storage: bool = False    # copy_storage without TLS: the user accepts a plain NBD export
    dry_run: bool = False             # preflight and the destination's command line only


@dataclass
class CrossHostResult:
    guest: str
    new_name: str
    host: str
    address: Address
    uri: str
    outcome: MigrationOutcome
    command: str = ""
    source_state: str = ""
    dest_state: str = ""
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class NewImage:
    """--copy-storage: an image to create on HOST for a writable disk of the source."""

    path: str
    command: str                      # the `qemu-img create` that makes it


@dataclass(frozen=True)
class CrossHostPlan:
    """What a live migration to another host will do, as its preflight found it before anything was
    started: the destination (its command line, run directory, monitors), the ports, the new images."""

    req: CrossHostRequest
    source: Address                   # the source's monitor
    twin: TwinPlan                    # the destination: -incoming defer
    port: int | None                  # where it listens on HOST (TCP; None with --tunnel or a dry run)
    nbd_port: int | None              # --copy-storage: the NBD server's port on HOST
    image_dir: str                    # --copy-storage: where the new images go on HOST
    images: tuple[NewImage, ...]      # ... and what they are
    notes: tuple[str, ...]
    warnings: tuple[str, ...]

    @property
    def new_name(self) -> str:
        return self.twin.name

    def dry_result(self) -> CrossHostResult:
        """What a run would do; nothing was started."""
        return CrossHostResult(self.req.guest, self.new_name, self.req.to, self.twin.address, "-",
                               MigrationOutcome("not started", "dry run: nothing was started"),
                               command=self.twin.command.shell(), source_state="untouched (--dry-run)",
                               dest_state="not started (--dry-run)", notes=list(self.notes),
                               warnings=list(self.warnings))


Progress = Callable[[str], None]
Confirm = Callable[[str], Awaitable[None]]      # raises Refused when not confirmed
Edit = Callable[[str], Awaitable[str]]          # the user edits a text (the destination's command line)
OnJob = Callable[[MigrationJob], None]


class CrossHostMigration:
    """The steps in the module docstring: ``preflight()`` (nothing started; Refused / ConfigError / another
    KvmError) returns a CrossHostPlan; ``run(plan)`` returns a CrossHostResult or raises CrossHostFailed
    after undoing. ``aclose()`` at the end, whatever happened."""

    def __init__(self, fleet: Fleet, pool: HostPool, req: CrossHostRequest, *, progress: Progress | None = None,
                 confirm: Confirm | None = None, on_job: OnJob | None = None, edit: Edit | None = None) -> None:
        self.edit = edit
        self.fleet = fleet
        self.pool = pool
        self.req = req
        self.progress = progress or (lambda message: None)
        self.confirm = confirm
        self.on_job = on_job
        self.ledger = Ledger()
        self.src: HostShell | None = None
        self.dst: HostShell | None = None
        self.twin: Twin | None = None
        self.forward: LocalForward | None = None
        self.local_dir: str | None = None
        self.created: list[str] = []          # --copy-storage: images created on HOST (removed on failure)
        self.was_running = False

    # -- 1. preflight ------------------------------------------------------------------------
    async def preflight(self) -> CrossHostPlan:
        req, pool = self.req, self.pool
        guest = self.fleet.get(req.guest)
        self.mon: Monitor = guest.require()
        address = guest.address
        if req.to not in pool.hosts:
            known = ", ".join(pool.hosts) or "none configured"
            raise ConfigError(f"--to-host {req.to}: not a configured host (hosts: {known}); add a "
                              f"[hosts.{req.to}] table")
        src_host = address.ssh
        if src_host is not None and pool.key(src_host) == pool.key(req.to):
            raise Refused(f"{req.guest} already runs on {pool.label(req.to)}: start a destination there with "
                          "-incoming defer and use `migrate --to DEST`")
        if req.tunnel and req.address:
            raise Refused("--address is where the source connects to HOST directly; with --tunnel it connects "
                          "to the tunnel's end here: drop one of them")
        if req.tunnel and src_host is not None:
            raise Refused(f"--tunnel needs the source QEMU on this host (the local end of the tunnel is here); "
                          f"{req.guest} runs on {pool.label(src_host)}")
        self.src = src = HostShell(pool if src_host else None, src_host, error=CrossHostFailed)
        self.dst = dst = HostShell(pool, req.to, error=CrossHostFailed)
        new_name = check_guest_name(req.new_name or f"{req.guest}.{req.to}", "name of the destination")
        if new_name in self.fleet:
            raise Refused(f"a guest named {new_name!r} is already attached")
        status = await self.mon.status()
        if status.state in (RunState.INMIGRATE, RunState.POSTMIGRATE, RunState.SHUTDOWN):
            raise Refused(f"{req.guest} is {status}: nothing to migrate")
        info = await self.mon.migration()
        if info.status.is_active:
            raise Refused(f"a migration of {req.guest} is already {info.status}")
        if req.copy_storage and req.tunnel:
            raise Refused("--copy-storage does not go through --tunnel yet: drop --tunnel (the disks go over NBD "
                          "on TCP)")
        if req.copy_storage and req.tls_root is None and not req.insecure_storage:
            raise Refused(f"--copy-storage to {dst.label} without --tls: its NBD server would let anyone who "
                          "reaches the port write the disks; add --tls DIR (certificates from `kvmshell tls-init`), "
                          "or --insecure-storage to accept that. Nothing was started")
        if req.copy_storage and not can_mirror(self.mon):
            raise Refused(f"--copy-storage needs a QMP monitor on both guests ({req.guest} speaks HMP)")
        self.progress(f"preflight: connecting to {dst.label}")
        await pool.connection(req.to)
        source_pid, cmd = await source_command(pool, src, address, req.guest, "the destination")
        relative = {p: a for p, a in (await absolute_images(src, source_pid, cmd)).items() if p != a}
        if relative:                                 # relative to where the source QEMU started
            cmd = rewrite_images(cmd, relative)
        run_dir = (req.run_dir or f"/run/kvmshell/{socket_name(new_name)}").rstrip("/") or "/"
        if not sockets_fit(run_dir, new_name):
            raise Refused(f"--dir {run_dir}: too long for the monitor sockets there (at most "
                          f"{MAX_SOCKET_PATH} characters with the socket name): pick a shorter one")
        notes: list[str] = []
        images: tuple[NewImage, ...] = ()
        image_dir = (req.run_dir or f"{DEFAULT_DIR}/{socket_name(new_name)}").rstrip("/") or "/"
        if req.copy_storage:
            cmd, images = await self._plan_images(cmd, req.copy_storage, image_dir, notes)
        else:
            await self._check_shared_storage(images_of(cmd), notes)
        twin = TwinPlan.derive(cmd, name=new_name, target=pool.lookup(req.to).ssh, run_dir=run_dir,
                               mode=Option("-incoming", "defer"))
        notes += twin.derived.notes
        warnings: list[str] = []
        tcg = await tcg_dirty_check(req.guest, self.mon)
        if tcg is not None:
            warnings.append(tcg)
        if self.edit is not None:           # before anything is started: the source runs on meanwhile
            edited = await twin.reviewed(self.edit, dst.label)
            if edited.command != twin.command:
                warnings.append("the destination's command line was edited before it ran")
            twin = edited
        port = nbd_port = None
        if not req.dry_run and not req.tunnel:
            port = nbd_port = await free_port(pool, req.to)
            while req.copy_storage and nbd_port == port:
                nbd_port = await free_port(pool, req.to)
        return CrossHostPlan(req, address, twin, port, nbd_port if req.copy_storage else None, image_dir, images,
                             tuple(notes), tuple(warnings))

    async def _check_shared_storage(self, tops: list[str], notes: list[str]) -> None:
        """Every image (and backing file) at the same path on HOST, with the same size."""
        assert self.src is not None and self.dst is not None
        paths: list[str] = []
        for top in tops:
            if top.startswith("/dev/"):
                paths.append(top)
                continue
            try:
                chain = [f.path for f in await backing_chain(self.src, top) if f.path.startswith("/")] or [top]
            except KvmError:
                chain = [top]
            paths += [p for p in chain if p not in paths]
        if not paths:
            return
        quoted = " ".join(shlex.quote(p) for p in paths)
        script = (f"for f in {quoted}; do if [ -e \"$f\" ]; then printf '%s\\t%s\\n' "
                  f"\"$(stat -L -c %s -- \"$f\")\" \"$f\"; else printf 'missing\\t%s\\n' \"$f\"; fi; done")
        here, there = await asyncio.gather(self.src.check(script, "looking at the images"),
                                           self.dst.check(script, "looking for the images"))

        def table(text: str) -> dict[str, str]:
            return {path: size for size, _, path in (line.partition("\t") for line in text.splitlines())}
        mine, theirs = table(here), table(there)
        missing = [p for p in paths if theirs.get(p, "missing") == "missing"]
        if missing:
            raise Refused(f"{', '.join(missing)}: not on {self.dst.label}. Live migration to another host needs "
                          "shared storage (the same image files at the same paths on both hosts, e.g. over NFS); "
                          "without it, use --copy-storage all|inc, or static-migrate, which copies the images")
        differ = [p for p in paths if not p.startswith("/dev/") and mine.get(p) != theirs.get(p)]
        if differ:
            raise Refused(f"{', '.join(differ)} on {self.dst.label} is not the file the source uses (size "
                          f"{theirs.get(differ[0])} there, {mine.get(differ[0])} here): live migration to another "
                          "host needs shared storage; without it, use static-migrate")
        notes.append(f"shared storage: {len(paths)} image file(s) found at the same paths on {self.dst.label}")

    async def _plan_images(self, cmd: QemuCommand, mode: str, image_dir: str,
                           notes: list[str]) -> tuple[QemuCommand, tuple[NewImage, ...]]:
        """--copy-storage: a new image on HOST for each writable disk of the source (checked here, made
        by ``_create_images``); the other images (a CD-ROM...) must be there as with shared storage.
        The command line with the new images, and what to create."""
        assert self.src is not None and self.dst is not None
        writable = {d.image.filename for d in writable_disks(await block_devices(self.mon)).values() if d.image}
        mapping: dict[str, str] = {}
        backing: list[str] = []
        images: list[NewImage] = []
        for top in images_of(cmd):
            if top not in writable:
                continue
            if top.startswith("/dev/"):
                raise Refused(f"--copy-storage: {top} is a device, not an image file kvmshell can create on "
                              f"{self.dst.label}")
            chain = await backing_chain(self.src, top)
            fmt, size = chain[0].format, chain[0].virtual_size
            name, i = os.path.basename(top), 1
            while f"{image_dir}/{name}" in mapping.values():
                i += 1
                name = f"{i}-{os.path.basename(top)}"
            dest = mapping[top] = f"{image_dir}/{name}"
            if mode == "inc":
                if len(chain) < 2 or fmt != "qcow2":
                    raise Refused(f"--copy-storage inc: {top} is not a qcow2 image over a backing file: copy it "
                                  "whole with --copy-storage all")
                base = chain[1]
                backing += [c.path for c in chain[1:] if c.path not in backing]
                create = (f"qemu-img create -q -f qcow2 -F {shlex.quote(base.format)} "
                          f"-b {shlex.quote(base.path)} {shlex.quote(dest)} {size}")
            else:
                create = f"qemu-img create -q -f {shlex.quote(fmt)} {shlex.quote(dest)} {size}"
            images.append(NewImage(dest, create))
        if not mapping:
            raise Refused(f"--copy-storage: {self.req.guest} has no writable disk image to copy")
        there = await self.dst.sizes(list(mapping.values()))
        if there:
            raise Refused(f"--copy-storage: {', '.join(there)} already on {self.dst.label}: kvmshell does not "
                          "overwrite images; remove them or pick another --dir")
        await self._check_backing(backing)
        rest = [p for p in images_of(cmd) if p not in mapping]
        if rest:
            await self._check_shared_storage(rest, notes)
        notes.append(f"no shared storage: {len(mapping)} disk(s) copied over NBD into new images in "
                     f"{image_dir} on {self.dst.label} ({mode})")
        return rewrite_images(cmd, mapping), tuple(images)

    async def _check_backing(self, paths: list[str]) -> None:
        """inc: each backing file at the same path on HOST, with the same size and sha256."""
        assert self.src is not None and self.dst is not None
        if not paths:
            return
        here, there = await asyncio.gather(self.src.sizes(paths), self.dst.sizes(paths))
        for p in paths:
            if p not in there:
                raise Refused(f"--copy-storage inc: the backing file {p} is not on {self.dst.label}: copy it there "
                              "first (same path), or use --copy-storage all")
            if here.get(p) != there[p]:
                raise Refused(f"--copy-storage inc: the backing file {p} on {self.dst.label} has {there[p]} bytes, "
                              f"{here.get(p)} here: not the same file")
        for p in paths:
            self.progress(f"preflight: sha256 of {p} on both hosts")
            mine, theirs = await asyncio.gather(self.src.sha256(p, size=here[p]), self.dst.sha256(p, size=there[p]))
            if mine != theirs:
                raise Refused(f"--copy-storage inc: the backing file {p} on {self.dst.label} differs from the one "
                              f"here (sha256 {theirs[:12]}... there, {mine[:12]}... here)")

    # -- 2. the destination ------------------------------------------------------------------
    async def _create_images(self, plan: CrossHostPlan) -> None:
        assert self.dst is not None
        await self.dst.check(f"mkdir -p -- {shlex.quote(plan.image_dir)}", f"creating {plan.image_dir}")
        for image in plan.images:
            await self.dst.check(image.command, f"creating {image.path}")
            self.created.append(image.path)
        self.ledger.done.append(f"created {len(self.created)} image(s) in {plan.image_dir} on {self.dst.label}")

    async def _uris(self, plan: CrossHostPlan) -> tuple[str, str | None]:
        """(where the source connects, where the destination listens if elsewhere)."""
        assert self.dst is not None
        if not plan.req.tunnel:
            assert plan.port is not None
            return f"tcp:{uri_host(plan.req.address or plan.twin.target.host)}:{plan.port}", None
        remote = plan.twin.path("mig")                  # fits: shorter than the monitor sockets
        await self.dst.sh(f"rm -f -- {shlex.quote(remote)}")
        self.local_dir = tempfile.mkdtemp(prefix="kvmshell-tunnel-")
        local = f"{self.local_dir}/mig.sock"
        self.forward = await forward_local_unix(await self.pool.connection(plan.req.to), local, remote)
        self.ledger.done.append(f"forwarded {local} here to {remote} on {self.dst.label} through SSH")
        return f"unix:{local}", f"unix:{remote}"

    # -- 3. the migration --------------------------------------------------------------------
    async def _migrate(self, plan: CrossHostPlan, dest_mon: Monitor) -> tuple[MigrationOutcome, str]:
        assert self.dst is not None
        req, ledger = plan.req, self.ledger
        uri, listen = await self._uris(plan)
        params = await self.mon.migrate_parameters()
        tls = None
        if req.tls_root is not None:
            dest = Address(Protocol.QMP, Kind.UNIX, path="-", ssh=plan.twin.target)
            tls = await tls_between(self.pool, (req.guest, plan.source), (plan.new_name, dest),
                                    req.tls_root, self.progress, only_source=req.tls_authz)
            ledger.notes.append(f"the stream went in TLS (certificates of {tls.hostname} in {tls.dest_dir} there)")
        if not req.tunnel and not params.get("tls-creds") and tls is None:
            ledger.warnings.append(f"the migration stream to {self.dst.label} ({uri}) is not encrypted (no "
                                   "tls-creds): anyone on the path can read the guest's memory; --tunnel carries it "
                                   "through SSH")
        if req.tunnel:
            ledger.notes.append("the stream went through the SSH connection (encrypted, relayed by kvmshell): "
                                "tunnelling costs throughput, expect it slower than a direct TCP stream")
        job_req = replace(req.job, source=req.guest, dest=plan.new_name, uri=uri, listen_uri=listen, tls=tls)
        stages: list[Stage] = []
        if req.copy_storage:
            assert plan.nbd_port is not None
            stages.append(StorageStage(req.copy_storage, tcp=(req.address or plan.twin.target.host, plan.nbd_port),
                                       check_backing=False, insecure=req.insecure_storage))   # _check_backing did
            if tls is None:
                ledger.warnings.append(f"the disks go to {self.dst.label} over NBD on TCP port {plan.nbd_port}, "
                                       "not encrypted (--insecure-storage)")
        job = MigrationJob(self.mon, dest_mon, job_req, hosts=self.pool, publish=self.fleet.publish, stages=stages)
        await job.prepare()
        if stages:                  # the stages' long work (the disk copy) comes before `migrate`: run does both
            self.progress(f"copying the disks to {plan.new_name}, then migrating ({uri})")
            outcome = await self._follow(job)
            ledger.done.append(f"ran the migration to {uri} ({outcome.status})")
            if outcome.ok:
                ledger.notes += outcome.notes
            return outcome, uri
        self.progress(f"migrating {req.guest} to {plan.new_name} ({listen + ' via ' + uri if listen else uri})")
        await job.start()
        ledger.done.append(f"started the migration to {uri}")
        return await self._follow(job), uri

    async def _follow(self, job: MigrationJob) -> MigrationOutcome:
        """Run the job to its end, with a progress line every second."""
        if self.on_job is not None:
            self.on_job(job)
        reporter = asyncio.create_task(self._report(job))
        try:
            return await job.run()
        finally:
            reporter.cancel()

    async def _report(self, job: MigrationJob) -> None:
        while True:
            await asyncio.sleep(1.0)
            last = job.sampler.ring.last
            if last is None:
                for stage in job.stages:
                    for name, value in stage.lines():
                        self.progress(f"{name}: {value}")
            if last is not None:
                self.progress(f"migration {last.status}: pass {last.pass_no}, {last.transferred / 2**20:.0f} MiB sent, "
                              f"{last.remaining / 2**20:.0f} MiB to go, {last.throughput / 1e6:.0f} MB/s")

    # -- the whole run -----------------------------------------------------------------------
    async def run(self, plan: CrossHostPlan) -> CrossHostResult:
        """Steps 2 to 4; a failure undoes (see the module docstring) and raises CrossHostFailed."""
        assert self.dst is not None
        req, ledger = plan.req, self.ledger
        ledger.notes += plan.notes
        ledger.warnings += plan.warnings
        self.was_running = (await self.mon.status()).running
        self.twin = twin = Twin(plan.twin, self.dst, self.pool, ledger)
        step = "start"
        outcome: MigrationOutcome | None = None
        try:
            if plan.images:
                await self._create_images(plan)
            await twin.start(plan.twin.command, "(-incoming defer)", timeout=START_TIMEOUT, progress=self.progress)
            dest_mon = await twin.attach()
            step = "migration"
            outcome, uri = await self._migrate(plan, dest_mon)
            if outcome.status in ("postcopy-paused", "source-lost"):
                await twin.detach()
                raise CrossHostFailed(f"{outcome.message}. {plan.new_name} on {self.dst.label} is left as it is "
                                      f"(pidfile {plan.twin.pidfile})", guest=req.guest)
            if not outcome.ok:
                raise CrossHostFailed(outcome.full_message)
            dest_state = await dest_mon.status()
        except CrossHostFailed as e:
            if outcome is not None and outcome.status in ("postcopy-paused", "source-lost"):
                raise
            await self._undo(plan)
            raise CrossHostFailed(ledger.story(step, e.message), guest=req.guest) from None
        except (KvmError, OSError) as e:
            await self._undo(plan)
            raise CrossHostFailed(ledger.story(step, e.message if isinstance(e, KvmError) else str(e)),
                                  guest=req.guest) from None
        except BaseException:
            await asyncio.shield(self._undo(plan))
            raise
        await twin.detach()
        self.fleet.add(plan.new_name, plan.twin.address)
        result = CrossHostResult(req.guest, plan.new_name, req.to, plan.twin.address, uri, outcome,
                                 command=plan.twin.command.shell(), dest_state=str(dest_state),
                                 notes=ledger.notes, warnings=ledger.warnings)
        await self._finish(result)
        return result

    async def _close_tunnel(self) -> None:
        if self.forward is not None:
            forward, self.forward = self.forward, None
            await forward.close()
        if self.local_dir is not None:
            shutil.rmtree(self.local_dir, ignore_errors=True)
            self.local_dir = None

    async def _undo(self, plan: CrossHostPlan) -> None:
        """Kill the destination, unless the migration completed (then the guest's state is there and
        the source is stopped in postmigrate: both are left alone, the destination attached); check
        the source runs where it was."""
        assert self.src is not None and self.dst is not None and self.twin is not None
        ledger, guest, name = self.ledger, plan.req.guest, plan.new_name
        await self.twin.detach()
        await self._close_tunnel()
        try:
            st = await self.mon.status()
        except KvmError as e:
            st = None
            ledger.kept.append(f"{guest}: its monitor does not answer ({e.message})")
        if st is not None and st.state is RunState.POSTMIGRATE and self.twin.started:
            ledger.kept.append(f"{name} on {self.dst.label}, not killed: the migration completed, so the "
                               f"guest's state is there (attached as {name}; its pid is in {plan.twin.pidfile}); "
                               f"{guest} is stopped in postmigrate: `cont` it only if {name} is dead, or quit it "
                               "once the destination runs")
            if name not in self.fleet:
                self.fleet.add(name, plan.twin.address)
            return
        await self.twin.undo()
        await self._remove_images(plan)
        if st is None:
            return
        if self.was_running and not st.running:
            try:
                await self.mon.hmp("cont")
                ledger.undone.append(f"resumed {guest}")
            except KvmError as e:
                ledger.kept.append(f"could not resume {guest} ({e.message}): run `cont` on it")
                return
            st = await self.mon.status()
        ledger.after = f"{guest} is {st} on {self.src.label}, as before"

    async def _remove_images(self, plan: CrossHostPlan) -> None:
        """--copy-storage: the images created on HOST go with a failed attempt."""
        assert self.dst is not None
        if not self.created:
            return
        try:
            await self.dst.check("rm -f -- " + " ".join(shlex.quote(p) for p in self.created), "removing the images")
            self.ledger.undone.append(f"removed the {len(self.created)} image(s) created in {plan.image_dir} on "
                                      f"{self.dst.label}")
        except KvmError as e:
            self.ledger.kept.append(f"the images created in {plan.image_dir} on {self.dst.label} ({e.message})")
        self.created = []

    # -- 4. the source -----------------------------------------------------------------------
    async def _finish(self, result: CrossHostResult) -> None:
        assert self.dst is not None
        req = self.req
        try:
            if self.confirm is not None:
                await self.confirm(f"{result.new_name} runs on {self.dst.label}; quit the source {req.guest}?")
        except Refused:
            result.source_state = ("kept, stopped after the migration (postmigrate; quitting it was not confirmed): "
                                   "do not `cont` it while the destination runs")
            return
        try:
            await self.mon.hmp("quit", timeout=10)
        except KvmError as e:            # QEMU may close the monitor before it answers
            log.debug("%s: quit: %s", req.guest, e)
        result.source_state = "quit"

    async def aclose(self) -> None:
        """Close the tunnel and the connections to both hosts."""
        await self._close_tunnel()
        for side in (self.src, self.dst):
            if side is not None:
                await side.aclose()


async def migrate_to_host(fleet: Fleet, pool: HostPool, req: CrossHostRequest, *, progress: Progress | None = None,
                          confirm: Confirm | None = None, on_job: OnJob | None = None,
                          edit: Edit | None = None) -> CrossHostResult:
    """Run a live migration to another host; see the module docstring."""
    engine = CrossHostMigration(fleet, pool, req, progress=progress, confirm=confirm, on_job=on_job, edit=edit)
    try:
        plan = await engine.preflight()
        return plan.dry_result() if req.dry_run else await engine.run(plan)
    finally:
        await engine.aclose()


__all__ = ["CrossHostFailed", "CrossHostMigration", "CrossHostPlan", "CrossHostRequest", "CrossHostResult",
           "NewImage", "migrate_to_host"]
