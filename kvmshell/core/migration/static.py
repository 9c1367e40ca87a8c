"""Static migration: stop the guest, `savevm`, copy its images to another host, start it there with
`-loadvm`, and only then quit the source.

The steps, and what a failure at each leaves (``StaticMigration.run``):

1. preflight - nothing is touched: the destination is a configured host and answers; the guest's
   command line (its pid from the monitor, through ``processes.discover``) and its images with their
   qcow2 backing chains (``qemu-img info -U --backing-chain``); no guest of the same name there;
   room in the destination directory (``df``) for what is not there yet.
2. ``stop`` and ``savevm TAG`` on the source.
3. copy each file (backing files first) through kvmshell (``static_copy``), to ``FILE.part`` then
   renamed: kvmshell relays what a command on the source reads (``send_command``) over the two SSH
   connections to a pipeline on the destination (``receive_command``) that appends it to the .part
   file and hashes the file's content as it grows, while ``b2sum`` reads the file on the source: both
   checksums are ready with the last byte, and compared before the rename. A ``.part`` left by an
   interrupted run is continued when its bytes are a prefix of the source (size + checksum of the
   prefix on both hosts); a file already there with the same checksum is not copied again. Copied
   overlays are pointed at the copied backing files (``qemu-img rebase -u``, with the rename).
4. start the copy from the derived command line (``cmdline.derive(loadvm=TAG)``, ``-daemonize``,
   monitors in a run directory beside the images), check its status through its monitor, and
   attach it to the fleet as ``NAME@HOST``.
5. quit the source (unless ``keep_source``), after confirmation.

A failure before step 5 undoes, in reverse order: the destination QEMU is killed, the snapshot
made in step 2 is deleted (``delvm``: the source's disks hold what they held before), the source
is resumed if it was running. Copied files stay on the destination (a later run continues from
them) and the error says so, with what was done and what was undone.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import shlex
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime

from kvmshell.core.values.address import Address, Kind, Protocol, check_guest_name
from kvmshell.core.values.units import human_bytes
from kvmshell.core.values.cmdline import (
    Derived, Option, QemuCommand, derive, images_of, review, rewrite_images,
)
from kvmshell.core.monitor.fleet import Fleet
from kvmshell.core.values.models import RunState
from kvmshell.core.monitor.base import Monitor, open_monitor
from kvmshell.core.hosts.pool import HostPool
from kvmshell.core.hosts.processes import discover, parse_qemu_cmdline, source_command
from kvmshell.core.hosts.shell import HostShell
from kvmshell.core.migration.static_copy import FileCopy, ImageFile, still_to_copy
from kvmshell.errors import ConfigError, KvmError, Refused

log = logging.getLogger(__name__)

SAVEVM_TIMEOUT = 600.0
START_TIMEOUT = 120.0
DEFAULT_DIR = "/var/lib/kvmshell/images"
MAX_SOCKET_PATH = 100            # sun_path is 108 bytes


class StaticFailed(KvmError):
    """Static migration stopped before the end; the message says what was done and undone."""

    title = "static migration failed"


@dataclass(frozen=True)
class StaticRequest:
    guest: str                   # fleet name of the source
    to: str                      # [hosts.NAME] of the destination
    tag: str | None = None       # default: a timestamped tag
    keep_source: bool = False
    dest_dir: str | None = None  # default: DEFAULT_DIR/GUEST
    paused: bool = False         # start the copy with -S (check it before it runs)
    new_name: str | None = None  # the copy's name in the fleet; default GUEST.HOST
    dry_run: bool = False        # preflight and the derived command line only: nothing is touched

@dataclass
class StaticResult:
    guest: str
    new_name: str
    host: str
    tag: str
    address: Address
    dest_dir: str
    files: list[ImageFile]
    times: dict[str, float] = field(default_factory=dict)
    copied_bytes: int = 0
    source_state: str = ""
    dest_state: str = ""
    command: str = ""
    notes: list[str] = field(default_factory=list)

    @property
    def throughput(self) -> float | None:
        t = self.times.get("copy")
        return self.copied_bytes / t if t and self.copied_bytes else None


Progress = Callable[[str], None]
Confirm = Callable[[str], Awaitable[None]]     # raises Refused when not confirmed
Edit = Callable[[str], Awaitable[str]]         # the user edits a text (the derived command line)


# == the engine =====================================================================================

def default_tag() -> str:
    return datetime.now().strftime("static-%Y%m%d-%H%M%S")


def _ram_bytes(cmd: QemuCommand) -> int:
    for v in reversed(cmd.values("-m")):
        m = re.match(r"(?:size=)?(\d+)([MGKT]?)", v)
        if m:
            return int(m.group(1)) << {"": 20, "M": 20, "G": 30, "K": 10, "T": 40}[m.group(2).upper()]
    return 128 << 20


_TAG_RE = re.compile(r"[A-Za-z0-9_.:-]{1,64}")


class StaticMigration:
    """One run of the steps in the module docstring. ``run()`` returns a StaticResult or raises
    StaticFailed (after undoing) / another KvmError from the preflight (nothing touched)."""

    def __init__(self, fleet: Fleet, pool: HostPool, req: StaticRequest, *,
                 progress: Progress | None = None, confirm: Confirm | None = None,
                 edit: Edit | None = None) -> None:
        self.fleet = fleet
        self.pool = pool
        self.req = req
        self.progress = progress or (lambda message: None)
        self.confirm = confirm
        self.edit = edit
        self.done: list[str] = []
        self.undone: list[str] = []
        self.kept: list[str] = []
        self.warnings: list[str] = []
        self.copy: FileCopy | None = None

    # -- 1. preflight ------------------------------------------------------------------------
    async def preflight(self, replay: bool = False) -> None:
        """Step 1 (nothing is touched). ``replay``: for ``loadvm-on`` - the images are already on the
        host and hold the tag; the host may be the guest's own."""
        req, pool = self.req, self.pool
        guest = self.fleet.get(req.guest)
        self.mon: Monitor = guest.require()
        self.address = guest.address
        if req.to not in pool.hosts:
            known = ", ".join(pool.hosts) or "none configured"
            raise ConfigError(f"--to {req.to}: not a configured host (hosts: {known}); add a [hosts.{req.to}] table")
        self.dest_target = pool.lookup(req.to).ssh
        src_host = self.address.ssh
        if not replay and src_host is not None and pool.key(src_host) == pool.key(req.to):
            raise Refused(f"{req.guest} already runs on {pool.label(req.to)}: static migration copies a guest to "
                          "another host (use savevm/loadvm on the same host)")
        self.src = HostShell(pool if src_host else None, src_host, error=StaticFailed)
        self.dst = HostShell(pool, req.to, error=StaticFailed)
        self.progress(f"preflight: connecting to {self.dst.label}")
        await pool.connection(req.to)                         # reachable, or the SSH error says why
        self.cmd = await self._command_line()
        qemu_name, _ = parse_qemu_cmdline(self.cmd.argv())
        self.qemu_name = qemu_name or req.guest
        self.new_name = check_guest_name(req.new_name or f"{req.guest}.{req.to}", "name of the copy")
        if self.new_name in self.fleet:
            raise Refused(f"a guest named {self.new_name!r} is already attached")
        for g in await discover(pool, req.to):
            if g.pid == self.source_pid and any(m.same_target(self.address) for m in g.monitors):
                continue               # the source itself, seen through a process table both hosts share
            if g.name in (self.qemu_name, f"{self.qemu_name}-{g.pid}"):     # discover adds -PID to twins
                raise Refused(f"a guest named {self.qemu_name!r} already runs on {self.dst.label} (pid {g.pid}): "
                              "quit it first")
        self.dest_dir = (req.dest_dir or f"{DEFAULT_DIR}/{self.qemu_name}").rstrip("/") or "/"
        if replay:
            assert req.tag
            self.tag = req.tag
            self.files = await self._images()
            await self._check_replay_images()
            await self._review()
            return
        self.tag = req.tag or default_tag()
        if not _TAG_RE.fullmatch(self.tag):
            raise Refused(f"snapshot tag {self.tag!r}: use letters, digits and _ . : - (it goes on QEMU's "
                          "command line as -loadvm TAG)")
        existing = {s.tag for s in await self.mon.snapshots()}
        if self.tag in existing:
            raise Refused(f"{req.guest} already has a snapshot {self.tag!r}: pick another --tag (static-migrate "
                          "does not replace snapshots)")
        self.files = await self._images()
        await self.dst.check(f"mkdir -p -- {shlex.quote(self.dest_dir)}", f"creating {self.dest_dir}")
        need = await self._space_needed()
        avail = await self._avail()
        ram = _ram_bytes(self.cmd)
        if avail < need:
            raise Refused(f"not enough space in {self.dest_dir} on {self.dst.label}: {human_bytes(avail)} free, the "
                          f"images need {human_bytes(need)} (plus up to {human_bytes(ram)} of saved RAM)")
        if avail < need + ram:
            self.warnings.append(f"{self.dest_dir} has {human_bytes(avail)} free: enough for the images "
                             f"({human_bytes(need)}) but maybe not for the saved RAM (up to {human_bytes(ram)})")
        await self._review()

    def _derive(self) -> Derived:
        """The copy's command line: the source's, with images in ``dest_dir``, monitors and pidfile in
        a run directory there, ``-daemonize`` and ``-loadvm TAG``."""
        self.sock_name = re.sub(r"[^A-Za-z0-9_.-]", "-", self.new_name)     # one set of sockets per copy
        self.run_dir = f"{self.dest_dir}/run"
        if len(f"{self.run_dir}/{self.sock_name}-2.hmp") > MAX_SOCKET_PATH:
            self.run_dir = f"/run/kvmshell/{self.sock_name}"
        dest_of = {f.source: f.dest for f in self.files}
        cmd = rewrite_images(self.cmd, {given: dest_of[top] for given, top in self.named.items() if top in dest_of})
        self.pidfile = f"{self.run_dir}/{self.sock_name}.pid"
        return derive(cmd, socket_dir=self.run_dir, name=self.sock_name, loadvm=self.tag, pidfile=self.pidfile,
                      detach=True)

    async def _review(self) -> None:
        """Derive the copy's command line and, with ``edit``, let the user change it (before anything
        is touched: the source keeps running while they edit)."""
        self.derived = self._derive()
        self.dest_argv = self.derived.command
        if self.edit is None:
            return
        required = [Option("-loadvm", self.tag), Option("-daemonize"), Option("-pidfile", self.pidfile)]
        edited = await review(self.dest_argv, self.edit, required=required,
                              title=f"the command that starts {self.new_name} on {self.dst.label}",
                              paths=[path for _, path in self.derived.monitors])
        if edited != self.dest_argv:
            self.warnings.append("the copy's command line was edited before it ran")
        self.dest_argv = edited

    def dry_result(self) -> StaticResult:
        """What a run would do, after the preflight; nothing was touched."""
        proto, path = next(((p, s) for p, s in self.derived.monitors if p == "qmp"), self.derived.monitors[0])
        return StaticResult(self.req.guest, self.new_name, self.req.to, self.tag,
                            Address(Protocol(proto), Kind.UNIX, path=path, ssh=self.dest_target), self.dest_dir,
                            self.files, dest_state="not started (--dry-run)", source_state="untouched (--dry-run)",
                            command=self.dest_argv.shell(), notes=[*self.derived.notes, *self.warnings])

    async def _check_replay_images(self) -> None:
        tops = [f for f in self.files if f.top]
        there = await self.dst.sizes([f.dest for f in tops])
        missing = [f.dest for f in tops if f.dest not in there]
        if missing:
            raise Refused(f"not on {self.dst.label}: {', '.join(missing)} (copy the images there first, e.g. "
                          "with static-migrate --keep-source)")
        for f in tops:
            if f.format != "qcow2":
                continue
            text = await self.dst.check(f"qemu-img info -U --output=json -- {shlex.quote(f.dest)}",
                                        f"qemu-img info {f.dest}")
            try:
                tags = {str(t.get("name")) for t in json.loads(text).get("snapshots", [])}
            except (ValueError, AttributeError):
                raise StaticFailed(f"qemu-img info {f.dest}: unreadable answer") from None
            if self.tag not in tags:
                raise Refused(f"{f.dest} on {self.dst.label} has no snapshot {self.tag!r} "
                              f"(it has: {', '.join(sorted(tags)) or 'none'})")

    async def replay(self) -> StaticResult:
        """``loadvm-on``: start a copy of the guest on the host from images there that hold the tag;
        the guest itself is not touched."""
        t0 = time.monotonic()
        try:
            await self.preflight(replay=True)
            if self.req.dry_run:
                return self.dry_result()
            times = {"preflight": time.monotonic() - t0}
            self.was_running, self.dest_pidfile = True, None
            t = time.monotonic()
            try:
                result = await self._start(0, times)
                self.fleet.add(result.new_name, result.address)
            except (KvmError, OSError) as e:
                message = e.message if isinstance(e, KvmError) else str(e)
                self.stopped = self.saved = False
                await self._undo()
                undone = f"; undone: {'; '.join(self.undone)}" if self.undone else ""
                raise StaticFailed(f"start failed: {message}{undone}", guest=self.req.guest) from None
            times["start"] = time.monotonic() - t
            result.source_state = "untouched"
            return result
        finally:
            await asyncio.gather(*(s.aclose() for s in (getattr(self, "src", None), getattr(self, "dst", None))
                                   if s is not None), return_exceptions=True)

    async def _command_line(self) -> QemuCommand:
        self.source_pid, cmd = await source_command(self.pool, self.src, self.address, self.req.guest, "the copy")
        return cmd

    async def _images(self) -> list[ImageFile]:
        paths = images_of(self.cmd)
        if not paths:
            raise Refused(f"{self.req.guest} has no disk image: savevm needs a qcow2 disk")
        files: dict[str, ImageFile] = {}
        order: list[ImageFile] = []
        self.named: dict[str, str] = {}          # the image path as the command line has it -> absolute
        cwd = ""
        if any(not p.startswith("/") for p in paths):       # relative to where QEMU was started
            cwd = (await self.src.check(f"readlink /proc/{self.source_pid}/cwd", "the QEMU's directory")).strip()
        for given in paths:
            top = given if given.startswith("/") else f"{cwd.rstrip('/')}/{given}"
            self.named[given] = top
            text = await self.src.check(f"qemu-img info -U --backing-chain --output=json -- {shlex.quote(top)}",
                                        f"qemu-img info {top}")
            try:
                chain = json.loads(text)
            except ValueError:
                raise StaticFailed(f"qemu-img info {top}: unreadable answer") from None
            chain = chain if isinstance(chain, list) else [chain]
            for i, info in enumerate(chain):
                path = str(info.get("filename", ""))
                if not path.startswith("/") or path.startswith("/dev/"):
                    raise Refused(f"{path or top}: only image files can be copied (not devices or network disks)")
                nxt = chain[i + 1] if i + 1 < len(chain) else None
                if path in files:
                    files[path].top = files[path].top or i == 0
                    continue
                f = ImageFile(path, "", str(info.get("format", "raw")), top=(i == 0),
                              backing=str(nxt["filename"]) if nxt else None,
                              backing_format=str(nxt.get("format")) if nxt else None)
                files[path] = f
                order.append(f)
        if not any(f.format == "qcow2" and f.top for f in order):
            raise Refused(f"{self.req.guest} has no qcow2 disk: savevm needs one to hold the snapshot")
        used: set[str] = set()
        for f in order:
            base = os.path.basename(f.source)
            name, i = base, 1
            while name in used:
                i += 1
                name = f"{i}-{base}"
            used.add(name)
            f.dest = f"{self.dest_dir}/{name}"
            if f.dest == f.source:
                raise Refused(f"{f.source} would be copied onto itself: pick another --dir")
        sizes = await self.src.sizes([f.source for f in order])
        for f in order:
            if f.source not in sizes:
                raise Refused(f"{f.source}: not a regular file on {self.src.label}")
            f.size = sizes[f.source]
        order.sort(key=lambda f: f.top)                      # backing files first
        return order

    async def _space_needed(self) -> int:
        paths = [p for f in self.files for p in (f.dest, f.dest + ".part")]
        return still_to_copy(self.files, await self.dst.sizes(paths))

    async def _avail(self) -> int:
        out = await self.dst.check(f"df -B1 --output=avail -- {shlex.quote(self.dest_dir)}",
                                   f"df {self.dest_dir}")
        nums = [int(w) for w in out.split() if w.isdigit()]
        if not nums:
            raise StaticFailed(f"df {self.dest_dir} on {self.dst.label}: unreadable answer {out.strip()!r}")
        return nums[-1]

    # -- the whole run -----------------------------------------------------------------------
    async def run(self) -> StaticResult:
        t0 = time.monotonic()
        try:
            await self.preflight()
            if self.req.dry_run:
                return self.dry_result()
            times = {"preflight": time.monotonic() - t0}
            result = await self._migrate(times)
        finally:
            await asyncio.gather(*(s.aclose() for s in (getattr(self, "src", None), getattr(self, "dst", None))
                                   if s is not None), return_exceptions=True)
        return result

    async def _migrate(self, times: dict[str, float]) -> StaticResult:
        req = self.req
        self.was_running = False
        self.stopped = self.saved = False
        self.dest_pidfile: str | None = None
        step = "stop"
        try:
            t = time.monotonic()
            self.was_running = (await self.mon.status()).running
            if self.was_running:
                await self.mon.hmp("stop")
                self.stopped = True
                self.done.append(f"stopped {req.guest}")
            step = "savevm"
            self.progress(f"savevm {self.tag}")
            await self.mon.hmp(f"savevm {self.tag}", timeout=SAVEVM_TIMEOUT)
            self.saved = True
            self.done.append(f"saved snapshot {self.tag!r} on {req.guest}")
            times["savevm"] = time.monotonic() - t
            step = "copy"
            t = time.monotonic()
            copied = await self._copy_all()
            times["copy"] = time.monotonic() - t
            step = "start"
            t = time.monotonic()
            result = await self._start(copied, times)
            times["start"] = time.monotonic() - t
            self.fleet.add(result.new_name, result.address)
        except (KvmError, OSError) as e:
            message = e.message if isinstance(e, KvmError) else str(e)
            await self._undo()
            parts = [f"{step} failed: {message}"]
            parts.append(f"done: {'; '.join(self.done)}" if self.done else "nothing was done")
            if self.undone:
                parts.append(f"undone: {'; '.join(self.undone)}")
            if self.kept:
                parts.append(f"kept: {'; '.join(self.kept)}")
            raise StaticFailed(". ".join(parts), guest=req.guest) from None
        except BaseException:
            await asyncio.shield(self._undo())
            raise
        await self._finish(result)
        return result

    async def _undo(self) -> None:
        """Put the source back as it was (the copy on the destination is killed, not left running)."""
        if self.dest_pidfile is not None:
            p = shlex.quote(self.dest_pidfile)
            try:
                await self.dst.sh(f"[ -f {p} ] && kill $(cat {p}) 2>/dev/null; rm -f {p}; true")
                self.undone.append(f"killed the copy started on {self.dst.label}")
            except KvmError as e:
                self.kept.append(f"could not kill the copy on {self.dst.label} ({e.message}): pid in {self.dest_pidfile}")
        if self.saved:
            try:
                await self.mon.hmp(f"delvm {self.tag}", timeout=SAVEVM_TIMEOUT)
                self.undone.append(f"deleted snapshot {self.tag!r}")
            except KvmError as e:
                self.kept.append(f"snapshot {self.tag!r} could not be deleted ({e.message})")
        if self.stopped:
            try:
                await self.mon.hmp("cont")
                self.undone.append(f"resumed {self.req.guest} (it is running again)")
            except KvmError as e:
                self.kept.append(f"could not resume {self.req.guest} ({e.message}): run `cont` on it")
        elif self.saved:
            self.undone.append(f"{self.req.guest} was paused before and stays paused")
        if self.copy is not None and self.copy.copied_any:
            self.kept.append(f"the files copied to {self.dest_dir} on {self.dst.label} (a new run continues from "
                             "them)")

    # -- 3. copy -----------------------------------------------------------------------------
    async def _copy_all(self) -> int:
        self.copy = FileCopy(self.src, self.dst, self.files, self.dest_dir, self.progress, error=StaticFailed)
        copied = await self.copy.run()
        self.done.append(f"copied {len(self.files)} file(s) to {self.dest_dir} on {self.dst.label} "
                         f"({', '.join(f'{os.path.basename(f.dest)}: {f.outcome}' for f in self.files)})")
        return copied

    # -- 4. start ----------------------------------------------------------------------------
    async def _start(self, copied: int, times: dict[str, float]) -> StaticResult:
        req = self.req
        run_dir, sock_name, d = self.run_dir, self.sock_name, self.derived
        await self.dst.check(f"mkdir -p -- {shlex.quote(run_dir)}", f"creating {run_dir}")
        argv = self.dest_argv
        if (req.paused or not self.was_running) and not argv.has("-S"):   # stays paused, like the source was
            argv = QemuCommand(argv.binary, (*argv.options, Option("-S")))
        pidfile = self.pidfile
        logfile = f"{run_dir}/{sock_name}.log"
        for _, path in d.monitors:
            await self.dst.sh(f"rm -f -- {shlex.quote(path)}")
        self.progress(f"starting {self.new_name} on {self.dst.label} with -loadvm {self.tag}")
        self.dest_pidfile = pidfile
        r = await self.dst.sh(f"{argv.shell()} </dev/null >{shlex.quote(logfile)} 2>&1", timeout=START_TIMEOUT)
        if not r.ok:
            tail = (await self.dst.sh(f"tail -n 3 -- {shlex.quote(logfile)}")).text.strip().replace("\n", " | ")
            raise StaticFailed(f"QEMU on {self.dst.label} exited with status {r.exit_status}: {tail or '(no output)'}")
        self.done.append(f"started {self.new_name} on {self.dst.label} from snapshot {self.tag!r}")
        proto, path = next(((p, s) for p, s in d.monitors if p == "qmp"), d.monitors[0])
        address = Address(Protocol(proto), Kind.UNIX, path=path, ssh=self.dest_target)
        mon = await open_monitor(self.new_name, address, hosts=self.pool, connect_timeout=15)
        try:
            status = await mon.status()
        finally:
            await mon.close()
        want_running = self.was_running and not req.paused
        if want_running and not status.running:
            raise StaticFailed(f"{self.new_name} started but is {status}, not running")
        if not want_running and status.state not in (RunState.PAUSED, RunState.PRELAUNCH, RunState.RUNNING):
            raise StaticFailed(f"{self.new_name} started but is {status}")
        return StaticResult(req.guest, self.new_name, req.to, self.tag, address, self.dest_dir, self.files,
                            times, copied, dest_state=str(status), command=argv.shell(), notes=[*d.notes, *self.warnings])

    # -- 5. the source -----------------------------------------------------------------------
    async def _finish(self, result: StaticResult) -> None:
        req = self.req
        if req.keep_source:
            result.source_state = "kept, paused (--keep-source): `cont` it only if the copy is quit"
            return
        try:
            if self.confirm is not None:
                await self.confirm(f"{result.new_name} runs on {self.dst.label}; quit the source {req.guest}?")
        except Refused:
            result.source_state = "kept, paused (quitting it was not confirmed)"
            return
        try:
            await self.mon.hmp("quit", timeout=10)
        except KvmError as e:            # QEMU may close the monitor before it answers
            log.debug("%s: quit: %s", req.guest, e)
        result.source_state = "quit"


async def migrate_static(fleet: Fleet, pool: HostPool, req: StaticRequest, *, progress: Progress | None = None,
                         confirm: Confirm | None = None, edit: Edit | None = None) -> StaticResult:
    """Run a static migration; see the module docstring."""
    return await StaticMigration(fleet, pool, req, progress=progress, confirm=confirm, edit=edit).run()


async def loadvm_on(fleet: Fleet, pool: HostPool, req: StaticRequest, *,
                    progress: Progress | None = None, edit: Edit | None = None) -> StaticResult:
    """Start a copy of ``req.guest`` on ``req.to`` from its images in ``req.dest_dir`` there, which
    already hold ``req.tag`` (``-loadvm``); attach it. The guest itself is not touched."""
    return await StaticMigration(fleet, pool, req, progress=progress, edit=edit).replay()


__all__ = ["StaticFailed", "StaticMigration", "StaticRequest", "StaticResult", "default_tag", "loadvm_on", "migrate_static"]
