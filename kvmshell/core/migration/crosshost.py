"""Live migration to another host: `migrate GUEST --to-host HOST [--tunnel]`.

Shared storage is assumed (the seed's NFS workflow): the destination opens the very image files the
source uses, at the same paths. The steps, and what a failure at each leaves:

1. preflight - nothing is touched: HOST is a configured host and answers; the source's command line
   (its pid from the monitor, through ``processes.discover``, then ``/proc/PID/cmdline``); every image of
   it and of its backing chains exists on HOST at the same path with the same size (else: refused,
   saying that live migration to another host needs shared storage).
2. start the destination on HOST from the derived command line (``cmdline.derive``: monitors and
   pidfile in a run directory, ``-incoming defer``, ``-daemonize``), and open its monitor through SSH.
3. the live-migration engine (``MigrationJob``) with that destination: both sides prepared, the
   destination listens on ``tcp:ADDR:PORT`` (ADDR: the host of HOST's ssh target, or the address
   given, which must be one of HOST's; PORT free there),
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
runs on where it was) and says what was done and undone. A migration that broke in postcopy is the
exception: the guest is split between the two QEMUs, and both are left alone.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import shlex
import shutil
import tempfile
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from kvmshell.core.values.address import Address, Kind, Protocol, SshTarget, check_guest_name, uri_host
from kvmshell.core.migration.live.endpoints import tls_between
from kvmshell.core.values.cmdline import Option, QemuCommand, derive, images_of, review, rewrite_images
from kvmshell.core.monitor.fleet import Fleet
from kvmshell.core.migration.live.job import MigrationJob
from kvmshell.core.migration.live.request import MigrationOutcome, MigrationRequest
from kvmshell.core.migration.live.stages import Stage
from kvmshell.core.migration.live.storage import StorageStage, block_devices, can_mirror, writable_disks
from kvmshell.core.values.models import RunState
from kvmshell.core.monitor.base import Monitor, open_monitor
from kvmshell.core.hosts.pool import HostPool
from kvmshell.core.hosts.processes import free_port, source_command
from kvmshell.core.hosts.shell import HostShell
from kvmshell.core.migration.static import DEFAULT_DIR, StaticFailed
from kvmshell.core.hosts.ssh.forward import LocalForward, forward_local_unix
from kvmshell.errors import ConfigError, KvmError, Refused

log = logging.getLogger(__name__)

START_TIMEOUT = 60.0
MAX_SOCKET_PATH = 100                 # sun_path is 108 bytes


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


Progress = Callable[[str], None]
Confirm = Callable[[str], Awaitable[None]]      # raises Refused when not confirmed
Edit = Callable[[str], Awaitable[str]]          # the user edits a text (the destination's command line)
OnJob = Callable[[MigrationJob], None]


class _CrossHostJob(MigrationJob):
    """The engine, with the destination listening where the source does not connect (the far end of
    an SSH tunnel); without ``listen_uri`` it is the engine as it is."""

    listen_uri: str | None = None

    async def _incoming(self, mon: Monitor, uri: str) -> None:  # type: ignore[override]
        await MigrationJob._incoming(mon, self.listen_uri or uri)


class CrossHostMigration:
    """One run of the steps in the module docstring."""

    def __init__(self, fleet: Fleet, pool: HostPool, req: CrossHostRequest, *, progress: Progress | None = None,
                 confirm: Confirm | None = None, on_job: OnJob | None = None, edit: Edit | None = None) -> None:
        self.edit = edit
        self.fleet = fleet
        self.pool = pool
        self.req = req
        self.progress = progress or (lambda message: None)
        self.confirm = confirm
        self.on_job = on_job
        self.done: list[str] = []
        self.undone: list[str] = []
        self.kept: list[str] = []
        self.notes: list[str] = []
        self.warnings: list[str] = []
        self.pidfile: str | None = None
        self.dest_mon: Monitor | None = None
        self.forward: LocalForward | None = None
        self.local_dir: str | None = None
        self.source_after = ""
        self.created: list[str] = []          # --copy-storage: images created on HOST (removed on failure)
        self.creates: list[str] = []          # ... the commands that create them

    # -- 1. preflight ------------------------------------------------------------------------
    async def preflight(self) -> None:
        req, pool = self.req, self.pool
        guest = self.fleet.get(req.guest)
        self.mon: Monitor = guest.require()
        self.address = guest.address
        if req.to not in pool.hosts:
            known = ", ".join(pool.hosts) or "none configured"
            raise ConfigError(f"--to-host {req.to}: not a configured host (hosts: {known}); add a "
                              f"[hosts.{req.to}] table")
        self.dest_target: SshTarget = pool.lookup(req.to).ssh
        src_host = self.address.ssh
        if src_host is not None and pool.key(src_host) == pool.key(req.to):
            raise Refused(f"{req.guest} already runs on {pool.label(req.to)}: start a destination there with "
                          "-incoming defer and use `migrate --to DEST`")
        if req.tunnel and req.address:
            raise Refused("--address is where the source connects to HOST directly; with --tunnel it connects "
                          "to the tunnel's end here: drop one of them")
        if req.tunnel and src_host is not None:
            raise Refused(f"--tunnel needs the source QEMU on this host (the local end of the tunnel is here); "
                          f"{req.guest} runs on {pool.label(src_host)}")
        self.src = HostShell(pool if src_host else None, src_host, error=StaticFailed)
        self.dst = HostShell(pool, req.to, error=StaticFailed)
        self.new_name = check_guest_name(req.new_name or f"{req.guest}.{req.to}", "name of the destination")
        if self.new_name in self.fleet:
            raise Refused(f"a guest named {self.new_name!r} is already attached")
        status = await self.mon.status()
        if status.state in (RunState.INMIGRATE, RunState.POSTMIGRATE, RunState.SHUTDOWN):
            raise Refused(f"{req.guest} is {status}: nothing to migrate")
        info = await self.mon.migration()
        if info.status.is_active:
            raise Refused(f"a migration of {req.guest} is already {info.status}")
        if req.copy_storage and req.tunnel:
            raise Refused("--copy-storage does not go through --tunnel yet: drop --tunnel (the disks go over NBD "
                          "on TCP)")
        if req.copy_storage and not can_mirror(self.mon):
            raise Refused(f"--copy-storage needs a QMP monitor on both guests ({req.guest} speaks HMP)")
        self.progress(f"preflight: connecting to {self.dst.label}")
        await pool.connection(req.to)
        self.cmd = await self._command_line()
        self.sock_name = re.sub(r"[^A-Za-z0-9_.-]", "-", self.new_name)
        self.run_dir = (req.run_dir or f"/run/kvmshell/{self.sock_name}").rstrip("/") or "/"
        if len(f"{self.run_dir}/{self.sock_name}-2.hmp") > MAX_SOCKET_PATH:
            raise Refused(f"--dir {self.run_dir}: too long for the monitor sockets there (at most "
                          f"{MAX_SOCKET_PATH} characters with the socket name): pick a shorter one")
        if req.copy_storage:
            await self._plan_images(req.copy_storage)
        else:
            await self._check_shared_storage()
        await self._review()

    async def _review(self) -> None:
        """Derive the destination's command line and, with ``edit``, let the user change it (before
        anything is started: the source keeps running meanwhile)."""
        self.pidfile = pidfile = f"{self.run_dir}/{self.sock_name}.pid"
        self.derived = d = derive(self.cmd, socket_dir=self.run_dir, name=self.sock_name, incoming="defer",
                                  pidfile=pidfile, detach=True)
        self.argv = d.command
        self.notes += list(d.notes)
        if self.edit is None:
            return
        edited = await review(self.argv, self.edit, paths=[path for _, path in d.monitors],
                              required=[Option("-incoming", "defer"), Option("-daemonize"), Option("-pidfile", pidfile)],
                              title=f"the command that starts {self.new_name} on {self.dst.label}")
        if edited != self.argv:
            self.warnings.append("the destination's command line was edited before it ran")
        self.argv = edited

    async def _command_line(self) -> QemuCommand:
        self.source_pid, cmd = await source_command(self.pool, self.src, self.address, self.req.guest,
                                                    "the destination")
        given = images_of(cmd)
        if any(not p.startswith("/") for p in given):          # relative to where the source QEMU started
            cwd = (await self.src.check(f"readlink /proc/{self.source_pid}/cwd", "the QEMU's directory")).strip()
            cmd = rewrite_images(cmd, {p: f"{cwd.rstrip('/')}/{p}" for p in given if not p.startswith("/")})
        return cmd

    async def _check_shared_storage(self, tops: list[str] | None = None) -> None:
        """Every image (and backing file) at the same path on HOST, with the same size."""
        paths: list[str] = []
        for top in images_of(self.cmd) if tops is None else tops:
            if top.startswith("/dev/"):
                paths.append(top)
                continue
            r = await self.src.sh(f"qemu-img info -U --backing-chain -- {shlex.quote(top)} 2>/dev/null | "
                                  "sed -n 's/^image: //p'")
            chain = [p for p in r.text.splitlines() if p.startswith("/")] or [top]
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
        self.notes.append(f"shared storage: {len(paths)} image file(s) found at the same paths on {self.dst.label}")

    async def _plan_images(self, mode: str) -> None:
        """--copy-storage: a new image on HOST for each writable disk of the source (checked here, made
        by ``_create_images``); the other images (a CD-ROM...) must be there as with shared storage."""
        self.image_dir = (self.req.run_dir or f"{DEFAULT_DIR}/{self.sock_name}").rstrip("/") or "/"
        writable = {d.image.filename for d in writable_disks(await block_devices(self.mon)).values() if d.image}
        mapping: dict[str, str] = {}
        backing: list[str] = []
        for top in images_of(self.cmd):
            if top not in writable:
                continue
            if top.startswith("/dev/"):
                raise Refused(f"--copy-storage: {top} is a device, not an image file kvmshell can create on "
                              f"{self.dst.label}")
            text = await self.src.check(f"qemu-img info -U --backing-chain --output=json -- {shlex.quote(top)}",
                                        f"qemu-img info {top}")
            chain = json.loads(text)
            chain = chain if isinstance(chain, list) else [chain]
            info = chain[0]
            fmt, size = str(info.get("format", "raw")), int(info["virtual-size"])
            name, i = os.path.basename(top), 1
            while f"{self.image_dir}/{name}" in mapping.values():
                i += 1
                name = f"{i}-{os.path.basename(top)}"
            dest = mapping[top] = f"{self.image_dir}/{name}"
            if mode == "inc":
                if len(chain) < 2 or fmt != "qcow2":
                    raise Refused(f"--copy-storage inc: {top} is not a qcow2 image over a backing file: copy it "
                                  "whole with --copy-storage all")
                base = chain[1]
                backing += [str(c["filename"]) for c in chain[1:] if str(c["filename"]) not in backing]
                create = (f"qemu-img create -q -f qcow2 -F {shlex.quote(str(base.get('format', 'raw')))} "
                          f"-b {shlex.quote(str(base['filename']))} {shlex.quote(dest)} {size}")
            else:
                create = f"qemu-img create -q -f {shlex.quote(fmt)} {shlex.quote(dest)} {size}"
            self.creates.append(create)
        if not mapping:
            raise Refused(f"--copy-storage: {self.req.guest} has no writable disk image to copy")
        there = await self.dst.sizes(list(mapping.values()))
        if there:
            raise Refused(f"--copy-storage: {', '.join(there)} already on {self.dst.label}: kvmshell does not "
                          "overwrite images; remove them or pick another --dir")
        await self._check_backing(backing)
        rest = [p for p in images_of(self.cmd) if p not in mapping]
        if rest:
            await self._check_shared_storage(rest)
        self.cmd = rewrite_images(self.cmd, mapping)
        self.notes.append(f"no shared storage: {len(mapping)} disk(s) copied over NBD into new images in "
                          f"{self.image_dir} on {self.dst.label} ({mode})")

    async def _check_backing(self, paths: list[str]) -> None:
        """inc: each backing file at the same path on HOST, with the same size and sha256."""
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

    async def _create_images(self) -> None:
        await self.dst.check(f"mkdir -p -- {shlex.quote(self.image_dir)}", f"creating {self.image_dir}")
        for create in self.creates:
            dest = shlex.split(create)[-2]
            await self.dst.check(create, f"creating {dest}")
            self.created.append(dest)
        self.done.append(f"created {len(self.created)} image(s) in {self.image_dir} on {self.dst.label}")

    # -- 2. the destination ------------------------------------------------------------------
    async def _start_destination(self) -> Address:
        run_dir, name, d = self.run_dir, self.sock_name, self.derived
        await self.dst.check(f"mkdir -p -- {shlex.quote(run_dir)}", f"creating {run_dir}")
        self.command = self.argv.shell()
        logfile = f"{run_dir}/{name}.log"
        for _, path in d.monitors:
            await self.dst.sh(f"rm -f -- {shlex.quote(path)}")
        self.progress(f"starting {self.new_name} on {self.dst.label} with -incoming defer")
        r = await self.dst.sh(f"{self.command} </dev/null >{shlex.quote(logfile)} 2>&1", timeout=START_TIMEOUT)
        if not r.ok:
            tail = (await self.dst.sh(f"tail -n 3 -- {shlex.quote(logfile)}")).text.strip().replace("\n", " | ")
            raise CrossHostFailed(f"QEMU on {self.dst.label} exited with status {r.exit_status}: "
                                  f"{tail or '(no output)'}")
        self.done.append(f"started {self.new_name} on {self.dst.label} (-incoming defer)")
        proto, path = next(((p, s) for p, s in d.monitors if p == "qmp"), d.monitors[0])
        address = Address(Protocol(proto), Kind.UNIX, path=path, ssh=self.dest_target)
        self.dest_mon = await open_monitor(self.new_name, address, hosts=self.pool, connect_timeout=15)
        return address

    async def _uris(self) -> tuple[str, str | None]:
        """(where the source connects, where the destination listens if elsewhere)."""
        if not self.req.tunnel:
            port = await free_port(self.pool, self.req.to)
            return f"tcp:{uri_host(self.req.address or self.dest_target.host)}:{port}", None
        remote = f"{self.run_dir}/{self.sock_name}.mig"
        if len(remote) > MAX_SOCKET_PATH:
            raise CrossHostFailed(f"{remote}: too long for a unix socket; pick a shorter --dir")
        await self.dst.sh(f"rm -f -- {shlex.quote(remote)}")
        self.local_dir = tempfile.mkdtemp(prefix="kvmshell-tunnel-")
        local = f"{self.local_dir}/mig.sock"
        self.forward = await forward_local_unix(await self.pool.connection(self.req.to), local, remote)
        self.done.append(f"forwarded {local} here to {remote} on {self.dst.label} through SSH")
        return f"unix:{local}", f"unix:{remote}"

    # -- 3. the migration --------------------------------------------------------------------
    async def _migrate(self) -> tuple[MigrationOutcome, str]:
        assert self.dest_mon is not None
        uri, listen = await self._uris()
        params = await self.mon.migrate_parameters()
        tls = None
        if self.req.tls_root is not None:
            dest = Address(Protocol.QMP, Kind.UNIX, path="-", ssh=self.dest_target)
            tls = await tls_between(self.pool, (self.req.guest, self.address), (self.new_name, dest),
                                    self.req.tls_root, self.progress, only_source=self.req.tls_authz)
            self.notes.append(f"the stream went in TLS (certificates of {tls.hostname} in {tls.dest_dir} there)")
        if not self.req.tunnel and not params.get("tls-creds") and tls is None:
            self.warnings.append(f"the migration stream to {self.dst.label} ({uri}) is not encrypted (no tls-creds): "
                                 "anyone on the path can read the guest's memory; --tunnel carries it through SSH")
        if self.req.tunnel:
            self.notes.append("the stream went through the SSH connection (encrypted, relayed by kvmshell): "
                              "tunnelling costs throughput, expect it slower than a direct TCP stream")
        req = MigrationRequest(**{**self.req.job.__dict__, "source": self.req.guest, "dest": self.new_name, "uri": uri,
                                  "tls": tls})
        stages: list[Stage] = []
        if self.req.copy_storage:
            port = await free_port(self.pool, self.req.to)
            while uri.endswith(f":{port}"):
                port = await free_port(self.pool, self.req.to)
            stages.append(StorageStage(self.req.copy_storage, tcp=(self.req.address or self.dest_target.host, port),
                                       check_backing=False))        # _check_backing did (sha256)
            self.warnings.append(f"the disks go to {self.dst.label} over NBD on TCP port {port}, not encrypted")
        job = _CrossHostJob(self.mon, self.dest_mon, req, hosts=self.pool, publish=self.fleet.publish, stages=stages)
        job.listen_uri = listen
        await job.prepare()
        if stages:
            return await self._migrate_with_stages(job, uri)
        self.progress(f"migrating {self.req.guest} to {self.new_name} ({listen + ' via ' + uri if listen else uri})")
        await job.start()
        self.done.append(f"started the migration to {uri}")
        return await self._follow(job), uri

    async def _migrate_with_stages(self, job: MigrationJob, uri: str) -> tuple[MigrationOutcome, str]:
        """The stages' long work (the disk copy) comes before `migrate`: ``run`` does both."""
        self.progress(f"copying the disks to {self.new_name}, then migrating ({uri})")
        outcome = await self._follow(job)
        self.done.append(f"ran the migration to {uri} ({outcome.status})")
        if outcome.ok:
            self.notes += outcome.notes
        return outcome, uri

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
    async def run(self) -> CrossHostResult:
        try:
            await self.preflight()
            if self.req.dry_run:
                return self.dry_result()
            return await self._run()
        finally:
            await self._close_tunnel()
            for side in (getattr(self, "src", None), getattr(self, "dst", None)):
                if side is not None:
                    await side.aclose()

    def dry_result(self) -> CrossHostResult:
        """What a run would do, after the preflight; nothing was started."""
        proto, path = next(((p, s) for p, s in self.derived.monitors if p == "qmp"), self.derived.monitors[0])
        return CrossHostResult(self.req.guest, self.new_name, self.req.to,
                               Address(Protocol(proto), Kind.UNIX, path=path, ssh=self.dest_target), "-",
                               MigrationOutcome("not started", "dry run: nothing was started"),
                               command=self.argv.shell(), source_state="untouched (--dry-run)",
                               dest_state="not started (--dry-run)", notes=self.notes, warnings=self.warnings)

    async def _run(self) -> CrossHostResult:
        req = self.req
        self.was_running = (await self.mon.status()).running
        step = "start"
        outcome: MigrationOutcome | None = None
        self.dest_address: Address | None = None
        try:
            if self.creates:
                await self._create_images()
            self.dest_address = address = await self._start_destination()
            step = "migration"
            outcome, uri = await self._migrate()
            if outcome.status in ("postcopy-paused", "source-lost"):
                await self._close_dest_monitor()
                raise CrossHostFailed(f"{outcome.message}. {self.new_name} on {self.dst.label} is left as it is "
                                      f"(pidfile {self.pidfile})", guest=req.guest)
            if not outcome.ok:
                raise CrossHostFailed(outcome.full_message)
            dest_state = await self.dest_mon.status() if self.dest_mon else None
        except CrossHostFailed as e:
            if outcome is not None and outcome.status in ("postcopy-paused", "source-lost"):
                raise
            await self._undo()
            raise CrossHostFailed(self._story(step, e.message), guest=req.guest) from None
        except (KvmError, OSError) as e:
            await self._undo()
            raise CrossHostFailed(self._story(step, e.message if isinstance(e, KvmError) else str(e)),
                                  guest=req.guest) from None
        except BaseException:
            await asyncio.shield(self._undo())
            raise
        await self._close_dest_monitor()
        self.fleet.add(self.new_name, address)
        result = CrossHostResult(req.guest, self.new_name, req.to, address, uri, outcome, command=self.command,
                                 dest_state=str(dest_state) if dest_state else "", notes=self.notes,
                                 warnings=self.warnings)
        await self._finish(result)
        return result

    def _story(self, step: str, message: str) -> str:
        parts = [f"{step} failed: {message}", f"done: {'; '.join(self.done)}" if self.done else "nothing was done"]
        if self.undone:
            parts.append(f"undone: {'; '.join(self.undone)}")
        if self.kept:
            parts.append(f"kept: {'; '.join(self.kept)}")
        if self.source_after:
            parts.append(self.source_after)
        return ". ".join(parts)

    async def _close_dest_monitor(self) -> None:
        if self.dest_mon is not None:
            mon, self.dest_mon = self.dest_mon, None
            try:
                await mon.close()
            except KvmError:
                pass

    async def _close_tunnel(self) -> None:
        if self.forward is not None:
            forward, self.forward = self.forward, None
            await forward.close()
        if self.local_dir is not None:
            shutil.rmtree(self.local_dir, ignore_errors=True)
            self.local_dir = None

    async def _undo(self) -> None:
        """Kill the destination, unless the migration completed (then the guest's state is there and
        the source is stopped in postmigrate: both are left alone, the destination attached); check
        the source runs where it was."""
        await self._close_dest_monitor()
        await self._close_tunnel()
        try:
            st = await self.mon.status()
        except KvmError as e:
            st = None
            self.kept.append(f"{self.req.guest}: its monitor does not answer ({e.message})")
        if st is not None and st.state is RunState.POSTMIGRATE and self.pidfile is not None and self.dest_address:
            self.kept.append(f"{self.new_name} on {self.dst.label}, not killed: the migration completed, so the "
                             f"guest's state is there (attached as {self.new_name}; its pid is in {self.pidfile}); "
                             f"{self.req.guest} is stopped in postmigrate: `cont` it only if {self.new_name} is "
                             "dead, or quit it once the destination runs")
            if self.new_name not in self.fleet:
                self.fleet.add(self.new_name, self.dest_address)
            return
        if self.pidfile is not None:
            try:
                if await self.dst.kill_pidfile(self.pidfile):
                    self.undone.append(f"killed {self.new_name} on {self.dst.label}")
                elif any(s.startswith("started ") and self.new_name in s for s in self.done):
                    self.undone.append(f"{self.new_name} on {self.dst.label} had exited already")
            except KvmError as e:
                self.kept.append(f"could not kill {self.new_name} on {self.dst.label} ({e.message}): its pid is in "
                                 f"{self.pidfile} there")
        await self._remove_images()
        if st is None:
            return
        if self.was_running and not st.running:
            try:
                await self.mon.hmp("cont")
                self.undone.append(f"resumed {self.req.guest}")
            except KvmError as e:
                self.kept.append(f"could not resume {self.req.guest} ({e.message}): run `cont` on it")
                return
            st = await self.mon.status()
        self.source_after = f"{self.req.guest} is {st} on {self.src.label}, as before"

    async def _remove_images(self) -> None:
        """--copy-storage: the images created on HOST go with a failed attempt."""
        if not self.created:
            return
        try:
            await self.dst.check("rm -f -- " + " ".join(shlex.quote(p) for p in self.created), "removing the images")
            self.undone.append(f"removed the {len(self.created)} image(s) created in {self.image_dir} on "
                               f"{self.dst.label}")
        except KvmError as e:
            self.kept.append(f"the images created in {self.image_dir} on {self.dst.label} ({e.message})")
        self.created = []

    # -- 4. the source -----------------------------------------------------------------------
    async def _finish(self, result: CrossHostResult) -> None:
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


async def migrate_to_host(fleet: Fleet, pool: HostPool, req: CrossHostRequest, *, progress: Progress | None = None,
                          confirm: Confirm | None = None, on_job: OnJob | None = None,
                          edit: Edit | None = None) -> CrossHostResult:
    """Run a live migration to another host; see the module docstring."""
    return await CrossHostMigration(fleet, pool, req, progress=progress, confirm=confirm, on_job=on_job,
                                    edit=edit).run()


__all__ = ["CrossHostFailed", "CrossHostMigration", "CrossHostRequest", "CrossHostResult", "migrate_to_host"]
