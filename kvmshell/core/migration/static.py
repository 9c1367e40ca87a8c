"""Static migration: stop the guest, `savevm`, copy its images to another host, start it there with
`-loadvm`, and only then quit the source.

The steps, and what a failure at each leaves (``StaticMigration``: ``preflight`` returns a
frozen ``StaticPlan``, ``run`` carries it out):

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
4. start the copy from the derived command line (a ``twin.Twin`` with ``-loadvm TAG``, ``-daemonize``,
   monitors in a run directory beside the images), check its status through its monitor, and
   attach it to the fleet as ``NAME@HOST``.
5. quit the source (unless ``keep_source``), after confirmation.

A failure before step 5 undoes, in reverse order: the destination QEMU is killed, the snapshot
made in step 2 is deleted (``delvm``: the source's disks hold what they held before), the source
is resumed if it was running. Copied files stay on the destination (a later run continues from
them) and the error says so, with what was done and what was undone (``ledger.Ledger``).
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
from dataclasses import dataclass, field, replace
from datetime import datetime

from kvmshell.core.hosts.pool import HostPool
from kvmshell.core.hosts.processes import discover, parse_qemu_cmdline, source_command
from kvmshell.core.hosts.shell import HostShell
from kvmshell.core.migration.history import MigrationHistory, record_static
from kvmshell.core.migration.images import absolute_images, backing_chain
from kvmshell.core.migration.ledger import Ledger
from kvmshell.core.migration.static_copy import FileCopy, ImageFile, name_copies, still_to_copy
from kvmshell.core.migration.twin import Twin, TwinPlan, socket_name, sockets_fit
from kvmshell.core.monitor.base import Monitor
from kvmshell.core.monitor.fleet import Fleet
from kvmshell.core.values.address import Address, SshTarget, check_guest_name
from kvmshell.core.values.cmdline import Option, QemuCommand, images_of, rewrite_images
from kvmshell.core.values.models import RunState
from kvmshell.core.values.units import human_bytes
from kvmshell.errors import ConfigError, KvmError, Refused

log = logging.getLogger(__name__)

SAVEVM_TIMEOUT = 600.0
START_TIMEOUT = 120.0
DEFAULT_DIR = "/var/lib/kvmshell/images"


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


@dataclass(frozen=True)
class StaticPlan:
    """What a static migration (or ``loadvm-on``) will do, as its preflight found it before anything was
    touched: the snapshot, the files to copy and where, the copy's command line."""

    req: StaticRequest
    tag: str
    dest_dir: str                 # on the destination: the images
    files: tuple[ImageFile, ...]  # backing files first; a run works on copies of them
    twin: TwinPlan                # the copy: its command line (-loadvm TAG), run directory, monitors
    notes: tuple[str, ...]        # the derived command line's and the preflight's warnings
    preflight_s: float = 0.0

    @property
    def new_name(self) -> str:
        return self.twin.name

    def dry_result(self) -> StaticResult:
        """What a run would do; nothing was touched."""
        return StaticResult(self.req.guest, self.new_name, self.req.to, self.tag, self.twin.address, self.dest_dir,
                            list(self.files), dest_state="not started (--dry-run)",
                            source_state="untouched (--dry-run)", command=self.twin.command.shell(),
                            notes=list(self.notes))


Progress = Callable[[str], None]
Confirm = Callable[[str], Awaitable[None]]     # raises Refused when not confirmed
Edit = Callable[[str], Awaitable[str]]         # the user edits a text (the derived command line)


# == the engine =====================================================================================

def _steps(times: dict[str, float]) -> list[tuple[float, str, str]]:
    """The steps done, each at its end (seconds from the start, after the preflight), for the history."""
    out, t = [], 0.0
    for name, took in times.items():
        t += took
        out.append((t, name, f"{name} took {took:.2f} s"))
    return out


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
    """The steps in the module docstring: ``preflight()`` (nothing touched; Refused / ConfigError / another
    KvmError) returns a StaticPlan; ``run(plan)`` returns a StaticResult or raises StaticFailed after
    undoing; ``replay(plan)`` is ``loadvm-on``. ``aclose()`` at the end, whatever happened."""

    def __init__(self, fleet: Fleet, pool: HostPool, req: StaticRequest, *,
                 progress: Progress | None = None, confirm: Confirm | None = None,
                 edit: Edit | None = None, history: MigrationHistory | None = None) -> None:
        self.fleet = fleet
        self.history = history if history is not None else MigrationHistory.default()
        self.pool = pool
        self.req = req
        self.progress = progress or (lambda message: None)
        self.confirm = confirm
        self.edit = edit
        self.ledger = Ledger()
        self.src: HostShell | None = None
        self.dst: HostShell | None = None
        self.copy: FileCopy | None = None
        self.twin: Twin | None = None
        self.copied: int | None = None             # bytes the copy sent (None until it ends)
        self.was_running = self.stopped = self.saved = False

    # -- 1. preflight ------------------------------------------------------------------------
    async def preflight(self, replay: bool = False) -> StaticPlan:
        """Step 1 (nothing is touched). ``replay``: for ``loadvm-on`` - the images are already on the
        host and hold the tag; the host may be the guest's own."""
        t0 = time.monotonic()
        req, pool = self.req, self.pool
        guest = self.fleet.get(req.guest)
        self.mon: Monitor = guest.require()
        address = guest.address
        if req.to not in pool.hosts:
            known = ", ".join(pool.hosts) or "none configured"
            raise ConfigError(f"--to {req.to}: not a configured host (hosts: {known}); add a [hosts.{req.to}] table")
        src_host = address.ssh
        if not replay and src_host is not None and pool.key(src_host) == pool.key(req.to):
            raise Refused(f"{req.guest} already runs on {pool.label(req.to)}: static migration copies a guest to "
                          "another host (use savevm/loadvm on the same host)")
        self.src = src = HostShell(pool if src_host else None, src_host, error=StaticFailed)
        self.dst = dst = HostShell(pool, req.to, error=StaticFailed)
        self.progress(f"preflight: connecting to {dst.label}")
        await pool.connection(req.to)                         # reachable, or the SSH error says why
        source_pid, cmd = await source_command(pool, src, address, req.guest, "the copy")
        qemu_name = parse_qemu_cmdline(cmd.argv())[0] or req.guest
        new_name = check_guest_name(req.new_name or f"{req.guest}.{req.to}", "name of the copy")
        if new_name in self.fleet:
            raise Refused(f"a guest named {new_name!r} is already attached")
        for g in await discover(pool, req.to):
            if g.pid == source_pid and any(m.same_target(address) for m in g.monitors):
                continue               # the source itself, seen through a process table both hosts share
            if g.name in (qemu_name, f"{qemu_name}-{g.pid}"):     # discover adds -PID to twins
                raise Refused(f"a guest named {qemu_name!r} already runs on {dst.label} (pid {g.pid}): "
                              "quit it first")
        dest_dir = (req.dest_dir or f"{DEFAULT_DIR}/{qemu_name}").rstrip("/") or "/"
        warnings: list[str] = []
        if replay:
            assert req.tag
            tag = req.tag
            named, files = await self._images(cmd, source_pid, dest_dir)
            await self._check_replay_images(files, tag)
        else:
            tag = req.tag or default_tag()
            if not _TAG_RE.fullmatch(tag):
                raise Refused(f"snapshot tag {tag!r}: use letters, digits and _ . : - (it goes on QEMU's "
                              "command line as -loadvm TAG)")
            if tag in {s.tag for s in await self.mon.snapshots()}:
                raise Refused(f"{req.guest} already has a snapshot {tag!r}: pick another --tag (static-migrate "
                              "does not replace snapshots)")
            named, files = await self._images(cmd, source_pid, dest_dir)
            warnings += await self._check_space(files, dest_dir, _ram_bytes(cmd))
        twin = self._twin(cmd, named, files, new_name, dest_dir, tag, pool.lookup(req.to).ssh)
        if self.edit is not None:           # before anything is touched: the source runs on meanwhile
            edited = await twin.reviewed(self.edit, dst.label)
            if edited.command != twin.command:
                warnings.append("the copy's command line was edited before it ran")
            twin = edited
        return StaticPlan(req, tag, dest_dir, tuple(files), twin, (*twin.derived.notes, *warnings),
                          time.monotonic() - t0)

    @staticmethod
    def _twin(cmd: QemuCommand, named: dict[str, str], files: list[ImageFile], new_name: str, dest_dir: str,
              tag: str, target: SshTarget) -> TwinPlan:
        """The copy's command line: the source's, with images in ``dest_dir``, monitors and pidfile in
        a run directory there, ``-daemonize`` and ``-loadvm TAG``."""
        run_dir = f"{dest_dir}/run"
        if not sockets_fit(run_dir, new_name):
            run_dir = f"/run/kvmshell/{socket_name(new_name)}"
        dest_of = {f.source: f.dest for f in files}
        cmd = rewrite_images(cmd, {given: dest_of[top] for given, top in named.items() if top in dest_of})
        return TwinPlan.derive(cmd, name=new_name, target=target, run_dir=run_dir, mode=Option("-loadvm", tag))

    async def _check_space(self, files: list[ImageFile], dest_dir: str, ram: int) -> list[str]:
        """Room in ``dest_dir`` for what is not there yet (Refused if not), and a warning if maybe not
        for the saved RAM too."""
        assert self.dst is not None
        dst = self.dst
        await dst.check(f"mkdir -p -- {shlex.quote(dest_dir)}", f"creating {dest_dir}")
        need = still_to_copy(files, await dst.sizes([p for f in files for p in (f.dest, f.dest + ".part")]))
        out = await dst.check(f"df -B1 --output=avail -- {shlex.quote(dest_dir)}", f"df {dest_dir}")
        nums = [int(w) for w in out.split() if w.isdigit()]
        if not nums:
            raise StaticFailed(f"df {dest_dir} on {dst.label}: unreadable answer {out.strip()!r}")
        avail = nums[-1]
        if avail < need:
            raise Refused(f"not enough space in {dest_dir} on {dst.label}: {human_bytes(avail)} free, the "
                          f"images need {human_bytes(need)} (plus up to {human_bytes(ram)} of saved RAM)")
        if avail < need + ram:
            return [f"{dest_dir} has {human_bytes(avail)} free: enough for the images "
                    f"({human_bytes(need)}) but maybe not for the saved RAM (up to {human_bytes(ram)})"]
        return []

    async def _check_replay_images(self, files: list[ImageFile], tag: str) -> None:
        assert self.dst is not None
        dst = self.dst
        tops = [f for f in files if f.top]
        there = await dst.sizes([f.dest for f in tops])
        missing = [f.dest for f in tops if f.dest not in there]
        if missing:
            raise Refused(f"not on {dst.label}: {', '.join(missing)} (copy the images there first, e.g. "
                          "with static-migrate --keep-source)")
        for f in tops:
            if f.format != "qcow2":
                continue
            text = await dst.check(f"qemu-img info -U --output=json -- {shlex.quote(f.dest)}",
                                   f"qemu-img info {f.dest}")
            try:
                tags = {str(t.get("name")) for t in json.loads(text).get("snapshots", [])}
            except (ValueError, AttributeError):
                raise StaticFailed(f"qemu-img info {f.dest}: unreadable answer") from None
            if tag not in tags:
                raise Refused(f"{f.dest} on {dst.label} has no snapshot {tag!r} "
                              f"(it has: {', '.join(sorted(tags)) or 'none'})")

    async def _images(self, cmd: QemuCommand, pid: int, dest_dir: str) -> tuple[dict[str, str], list[ImageFile]]:
        """The image paths as the command line has them -> absolute, and every file of their backing
        chains with its place in ``dest_dir`` (backing files first)."""
        assert self.src is not None
        src = self.src
        if not images_of(cmd):
            raise Refused(f"{self.req.guest} has no disk image: savevm needs a qcow2 disk")
        named = await absolute_images(src, pid, cmd)
        files: dict[str, ImageFile] = {}
        order: list[ImageFile] = []
        for top in named.values():
            chain = await backing_chain(src, top)
            for i, info in enumerate(chain):
                path = info.path
                if not path.startswith("/") or path.startswith("/dev/"):
                    raise Refused(f"{path or top}: only image files can be copied (not devices or network disks)")
                if path in files:
                    files[path].top = files[path].top or i == 0
                    continue
                f = ImageFile(path, "", info.format, top=(i == 0), backing=info.backing,
                              backing_format=info.backing_format)
                files[path] = f
                order.append(f)
        if not any(f.format == "qcow2" and f.top for f in order):
            raise Refused(f"{self.req.guest} has no qcow2 disk: savevm needs one to hold the snapshot")
        onto_itself = name_copies(order, dest_dir)
        if onto_itself:
            raise Refused(f"{onto_itself} would be copied onto itself: pick another --dir")
        sizes = await src.sizes([f.source for f in order])
        for f in order:
            if f.source not in sizes:
                raise Refused(f"{f.source}: not a regular file on {src.label}")
            f.size = sizes[f.source]
        order.sort(key=lambda f: f.top)                      # backing files first
        return named, order

    # -- 2.-5. the run -----------------------------------------------------------------------
    async def run(self, plan: StaticPlan) -> StaticResult:
        """Steps 2 to 5; a failure before 5 undoes (see the module docstring) and raises StaticFailed."""
        req = plan.req
        times = {"preflight": plan.preflight_s}
        files = [replace(f) for f in plan.files]       # the copy updates sizes and outcomes
        started, t0 = time.time(), time.monotonic()
        outcome = "cancelled"                          # unless it ends otherwise (Ctrl-C, a cancelled task)
        try:
            result = await self._run(plan, files, times)
            outcome = "completed"
        except StaticFailed:
            outcome = "failed"
            raise
        finally:
            record_static(self.history, guest=req.guest, source=self._source_label(), dest=req.to,
                          outcome=outcome, started=started, total_s=time.monotonic() - t0, sent_bytes=self.copied,
                          steps=_steps(times))
        return result

    def _source_label(self) -> str:
        """Where the guest ran, as the history says it: "local" or its SSH host."""
        ssh = self.fleet.get(self.req.guest).address.ssh
        return str(ssh) if ssh else "local"

    async def _run(self, plan: StaticPlan, files: list[ImageFile], times: dict[str, float]) -> StaticResult:
        req, ledger = plan.req, self.ledger
        ledger.step = "stop"
        async with ledger.undone_on_failure(lambda: self._undo(plan), self.progress, StaticFailed, req.guest):
            t = time.monotonic()
            self.was_running = (await self.mon.status()).running
            if self.was_running:
                await self.mon.hmp("stop")
                self.stopped = True
                ledger.done.append(f"stopped {req.guest}")
            ledger.step = "savevm"
            self.progress(f"savevm {plan.tag}")
            await self.mon.hmp(f"savevm {plan.tag}", timeout=SAVEVM_TIMEOUT)
            self.saved = True
            ledger.done.append(f"saved snapshot {plan.tag!r} on {req.guest}")
            times["savevm"] = time.monotonic() - t
            ledger.step = "copy"
            t = time.monotonic()
            copied = await self._copy_all(plan, files)
            times["copy"] = time.monotonic() - t
            ledger.step = "start"
            t = time.monotonic()
            result = await self._start(plan, files, copied, times)
            times["start"] = time.monotonic() - t
            self.fleet.add(result.new_name, result.address)
        await self._finish(result)
        return result

    async def replay(self, plan: StaticPlan) -> StaticResult:
        """``loadvm-on``: start a copy of the guest on the host from images there that hold the tag;
        the guest itself is not touched."""
        times = {"preflight": plan.preflight_s}
        self.was_running = True
        t = time.monotonic()
        try:
            result = await self._start(plan, list(plan.files), 0, times)
            self.fleet.add(result.new_name, result.address)
        except (KvmError, OSError) as e:
            await self._undo(plan)
            raise StaticFailed(self.ledger.short("start", e.message if isinstance(e, KvmError) else str(e)),
                               guest=self.req.guest) from None
        times["start"] = time.monotonic() - t
        result.source_state = "untouched"
        return result

    async def _undo(self, plan: StaticPlan) -> None:
        """Put the source back as it was (the copy on the destination is killed, not left running)."""
        ledger, guest = self.ledger, self.req.guest
        if self.twin is not None:
            await self.twin.undo()
        if self.saved:
            try:
                await self.mon.hmp(f"delvm {plan.tag}", timeout=SAVEVM_TIMEOUT)
                ledger.undone.append(f"deleted snapshot {plan.tag!r}")
            except KvmError as e:
                ledger.kept.append(f"snapshot {plan.tag!r} could not be deleted ({e.message})")
        if self.stopped:
            try:
                await self.mon.hmp("cont")
                ledger.undone.append(f"resumed {guest} (it is running again)")
            except KvmError as e:
                ledger.kept.append(f"could not resume {guest} ({e.message}): run `cont` on it")
        elif self.saved:
            ledger.undone.append(f"{guest} was paused before and stays paused")
        if self.copy is not None and self.copy.copied_any:
            assert self.dst is not None
            ledger.kept.append(f"the files copied to {plan.dest_dir} on {self.dst.label} (a new run continues "
                               "from them)")

    # -- 3. copy -----------------------------------------------------------------------------
    async def _copy_all(self, plan: StaticPlan, files: list[ImageFile]) -> int:
        assert self.src is not None and self.dst is not None
        self.copy = FileCopy(self.src, self.dst, files, plan.dest_dir, self.progress, error=StaticFailed)
        copied = self.copied = await self.copy.run()
        self.ledger.done.append(f"copied {len(files)} file(s) to {plan.dest_dir} on {self.dst.label} "
                                f"({', '.join(f'{os.path.basename(f.dest)}: {f.outcome}' for f in files)})")
        return copied

    # -- 4. start ----------------------------------------------------------------------------
    async def _start(self, plan: StaticPlan, files: list[ImageFile], copied: int,
                     times: dict[str, float]) -> StaticResult:
        assert self.dst is not None
        req = plan.req
        argv = plan.twin.command
        if (req.paused or not self.was_running) and not argv.has("-S"):   # stays paused, like the source was
            argv = QemuCommand(argv.binary, (*argv.options, Option("-S")))
        self.twin = twin = Twin(plan.twin, self.dst, self.pool, self.ledger)
        await twin.start(argv, f"from snapshot {plan.tag!r}", timeout=START_TIMEOUT, progress=self.progress)
        try:
            status = await (await twin.attach()).status()
        finally:
            await twin.detach()
        want_running = self.was_running and not req.paused
        if want_running and not status.running:
            raise StaticFailed(f"{plan.new_name} started but is {status}, not running")
        if not want_running and status.state not in (RunState.PAUSED, RunState.PRELAUNCH, RunState.RUNNING):
            raise StaticFailed(f"{plan.new_name} started but is {status}")
        return StaticResult(req.guest, plan.new_name, req.to, plan.tag, plan.twin.address, plan.dest_dir, files,
                            times, copied, dest_state=str(status), command=argv.shell(), notes=list(plan.notes))

    # -- 5. the source -----------------------------------------------------------------------
    async def _finish(self, result: StaticResult) -> None:
        assert self.dst is not None
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

    async def aclose(self) -> None:
        """Close the connections to both hosts (and what was started here through them)."""
        await asyncio.gather(*(s.aclose() for s in (self.src, self.dst) if s is not None), return_exceptions=True)


async def migrate_static(fleet: Fleet, pool: HostPool, req: StaticRequest, *, progress: Progress | None = None,
                         confirm: Confirm | None = None, edit: Edit | None = None) -> StaticResult:
    """Run a static migration; see the module docstring."""
    engine = StaticMigration(fleet, pool, req, progress=progress, confirm=confirm, edit=edit)
    try:
        plan = await engine.preflight()
        return plan.dry_result() if req.dry_run else await engine.run(plan)
    finally:
        await engine.aclose()


async def loadvm_on(fleet: Fleet, pool: HostPool, req: StaticRequest, *,
                    progress: Progress | None = None, edit: Edit | None = None) -> StaticResult:
    """Start a copy of ``req.guest`` on ``req.to`` from its images in ``req.dest_dir`` there, which
    already hold ``req.tag`` (``-loadvm``); attach it. The guest itself is not touched."""
    engine = StaticMigration(fleet, pool, req, progress=progress, edit=edit)
    try:
        plan = await engine.preflight(replay=True)
        return plan.dry_result() if req.dry_run else await engine.replay(plan)
    finally:
        await engine.aclose()


__all__ = ["StaticFailed", "StaticMigration", "StaticPlan", "StaticRequest", "StaticResult", "default_tag",
           "loadvm_on", "migrate_static"]
