"""One async interface to a guest's monitor, whatever protocol it speaks.

``Monitor`` is the base; ``QmpMonitor`` (qmp.py), ``HmpMonitor`` (hmp.py) and ``LibvirtMonitor``
(libvirt.py: a domain libvirt manages) implement it.
``open_monitor`` picks one from an ``Address``. Callers get typed objects from ``models``.
"""

from __future__ import annotations

import abc
import asyncio
import logging
import os
import random
import re
import stat
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from kvmshell.core.hosts.holder import holders
from kvmshell.core.hosts.pool import HostPool
from kvmshell.core.monitor import pagesample
from kvmshell.core.values import hmptext
from kvmshell.core.values.address import Address, Kind, Protocol
from kvmshell.core.values.models import (
    BlockDevice, BlockJob, Capabilities, DirtyRate, DirtyRateInfo, DirtyRateMeans, Event, MigrationInfo, MigrationParameters,
    NbdServer, PageSample, ParamValue, QemuVersion, Snapshot, Status,
)
from kvmshell.errors import CommandFailed, ConnectFailed, KvmError, MonitorTimeout

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 10.0          # seconds for an ordinary command
DEFAULT_CONNECT_TIMEOUT = 5.0   # seconds for connect + greeting/handshake

EventCallback = Callable[[Event], None]
Progress = Callable[[str], None]          # "saving 'tag'... 3 s": what a long action is doing

SNAPSHOT_TIMEOUT = 600.0         # seconds for savevm/loadvm/delvm of a big guest
PAGE_SAMPLE_TIMEOUT = 30.0       # seconds for `info mtree -f` of a guest with many devices
DIRTY_RATE_SLACK = 10.0          # seconds a dirty-rate measurement may take beyond its window
INCOMING_ENDS_S = 5.0            # seconds a guest may take to free its last incoming migration's state

MAX_HMP_LINE = 4000              # QEMU's readline keeps at most 4095 bytes of a line
_CONTROL_RE = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")


def clean_hmp_line(line: str, guest: str) -> str:
    """One HMP command line as QEMU's readline will take it, or CommandFailed before sending."""
    line = line.replace("\t", " ").strip()
    if _CONTROL_RE.search(line):
        raise CommandFailed("control characters (newlines included) are not allowed in a monitor command",
                            guest=guest)
    if len(line.encode()) > MAX_HMP_LINE:
        raise CommandFailed(f"command longer than {MAX_HMP_LINE} bytes", guest=guest)
    return line


async def start_when_incoming_ended(start: Callable[[], Awaitable[object]], *,
                                    within: float = INCOMING_ENDS_S) -> None:
    """Run ``start`` (an outgoing ``migrate``) and retry it while QEMU refuses it with "duplicate yank
    instance": a guest that has just received a migration frees that migration's state a moment
    after it says "completed" (after postcopy, in a thread of its own). The refusal changes nothing,
    so trying again is safe; after ``within`` seconds the refusal is raised."""
    deadline = time.monotonic() + within
    while True:
        try:
            await start()
            return
        except CommandFailed as e:
            if "duplicate yank instance" not in str(e) or time.monotonic() >= deadline:
                raise
        await asyncio.sleep(0.05)


@dataclass(frozen=True)
class Features:
    """What this guest's QEMU can do, discovered from the guest itself (never from its version)."""

    qmp_commands: frozenset[str]     # from query-commands; empty for an HMP-only monitor
    hmp_commands: frozenset[str]     # from HMP `help`

    def has_qmp(self, name: str) -> bool:
        return name in self.qmp_commands

    def has_hmp(self, name: str) -> bool:
        return name in self.hmp_commands


class Monitor(abc.ABC):
    protocol: Protocol
    delivers_events: bool            # QEMU's events (MIGRATION, DEVICE_DELETED...) reach subscribers
    notice: str | None = None        # something to tell the user once, when it first connects
    settings_per_migration = False   # capabilities and parameters go with one migration (libvirt's flags
                                     # and typed parameters): there is nothing to put back after it
    reports_start_failures_at_end = False   # the guest's manager (libvirt) runs the migration in one call: a
                                     # start that fails ends that call, and its outcome says where it left the guest
    # what a migration in its setup status waits for, and why it may not end: said when setup overruns
    setup_phase: tuple[str, str] = ("QEMU has been setting up the migration", "it has not reached the "
                                    "destination (does it listen on the URI, does a firewall drop the connection?)")

    def __init__(self, name: str, address: Address, *, timeout: float = DEFAULT_TIMEOUT,
                 connect_timeout: float = DEFAULT_CONNECT_TIMEOUT, hosts: HostPool | None = None) -> None:
        self.name = name
        self.address = address
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self.hosts = hosts                       # SSH connections for a monitor on another host
        self._own_hosts = False
        self.version: QemuVersion | None = None
        self.features = Features(frozenset(), frozenset())
        self.disconnect_reason: str | None = None
        self._closed = asyncio.Event()
        self._closed.set()                       # not connected yet
        self._subscribers: list[EventCallback] = []
        self._command_args: dict[str, frozenset[str]] | None = None    # from the QMP schema, once

    # -- life cycle --------------------------------------------------------------------------
    @abc.abstractmethod
    async def connect(self) -> None:
        """Connect, handshake, discover features and version. Raises ConnectFailed."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Disconnect (idempotent)."""

    def _host_pool(self) -> HostPool:
        """The pool that reaches ``address.ssh``: the one given, or a private one this monitor closes."""
        if self.hosts is None:
            self.hosts = HostPool(connect_timeout=self.connect_timeout)
            self._own_hosts = True
        return self.hosts

    async def _release_hosts(self) -> None:
        if self._own_hosts and self.hosts is not None:
            pool, self.hosts, self._own_hosts = self.hosts, None, False
            await pool.aclose()

    @property
    def connected(self) -> bool:
        return not self._closed.is_set()

    @property
    def finishing(self) -> bool:
        """QEMU has sent the whole migration stream and the guest's manager (libvirt) finishes the
        migration on the destination: nothing is left to transfer, the stall watchdog waits."""
        return False

    async def wait_closed(self) -> None:
        """Return once the monitor connection is gone (closed by us, or QEMU went away)."""
        await self._closed.wait()

    def _mark_open(self) -> None:
        self._command_args = None                # another QEMU may answer on this address now
        self.disconnect_reason = None
        self._closed.clear()

    def _mark_closed(self, reason: str) -> None:
        if not self._closed.is_set():
            self.disconnect_reason = reason
            self._closed.set()
            log.info("%s: monitor closed: %s", self.name, reason)

    # -- events ------------------------------------------------------------------------------
    def subscribe(self, callback: EventCallback) -> Callable[[], None]:
        """Call ``callback(event)`` for every event from this guest; returns the unsubscriber."""
        self._subscribers.append(callback)
        return lambda: self._subscribers.remove(callback) if callback in self._subscribers else None

    def _emit(self, name: str, data: Mapping[str, Any], timestamp: float | None = None) -> None:
        event = Event(self.name, name, data, timestamp if timestamp is not None else time.time())
        for cb in list(self._subscribers):
            try:
                cb(event)
            except Exception:  # a subscriber's bug must not stop the others
                log.exception("%s: event subscriber failed on %s", self.name, name)

    # -- commands ----------------------------------------------------------------------------
    async def command_args(self, command: str) -> frozenset[str]:
        """The argument names this QEMU's QMP ``command`` takes, from its schema (read once per
        connection: it is large)."""
        if self._command_args is None:
            schema = await self.execute("query-qmp-schema")
            by_name = {e.get("name"): e for e in schema}
            self._command_args = {
                e["name"]: frozenset(m["name"] for m in by_name.get(e.get("arg-type"), {}).get("members", []))
                for e in schema if e.get("meta-type") == "command"}
        return self._command_args.get(command, frozenset())

    async def argument_choices(self, command: str, argument: str) -> frozenset[str] | None:
        """The values an enum argument of this QEMU's QMP ``command`` takes (e.g. migrate-set-parameters'
        multifd-compression), from its schema; None when the schema cannot say (no QMP, not an enum)."""
        try:
            schema = await self.execute("query-qmp-schema")
        except KvmError:
            return None
        by_name = {e.get("name"): e for e in schema}
        cmd = next((e for e in schema if e.get("meta-type") == "command" and e.get("name") == command), None)
        members = by_name.get(cmd.get("arg-type"), {}).get("members", []) if cmd else []
        kind = next((m.get("type") for m in members if m.get("name") == argument), None)
        values = by_name.get(kind, {}).get("values")
        return frozenset(values) if values is not None else None

    @abc.abstractmethod
    async def hmp(self, line: str, timeout: float | None = None) -> str:
        """Run one HMP command line; its output. Raises CommandFailed when QEMU reports an error."""

    @abc.abstractmethod
    async def execute(self, command: str, arguments: Mapping[str, Any] | None = None,
                      timeout: float | None = None) -> Any:
        """Raw QMP (the one place QMP data leaves core: the `qmp` passthrough command)."""

    @abc.abstractmethod
    async def status(self) -> Status: ...

    @abc.abstractmethod
    async def migration(self) -> MigrationInfo: ...

    @abc.abstractmethod
    async def migrate_parameters(self) -> MigrationParameters: ...

    @abc.abstractmethod
    async def migrate_capabilities(self) -> Capabilities: ...

    @abc.abstractmethod
    async def snapshots(self) -> tuple[Snapshot, ...]: ...

    @abc.abstractmethod
    async def dirty_rate(self) -> DirtyRateInfo:
        """The last calc-dirty-rate's state and result (``start_dirty_rate`` starts one)."""

    @abc.abstractmethod
    async def vcpu_count(self) -> int: ...

    @abc.abstractmethod
    async def ram_size(self) -> int:
        """The guest's base memory in bytes."""

    @abc.abstractmethod
    async def uses_kvm(self) -> bool:
        """Whether the guest's vCPUs run under KVM (false: TCG, QEMU's emulator)."""

    @abc.abstractmethod
    async def qom_list(self, path: str) -> dict[str, str]:
        """The children and properties at a QOM path: {name: type}, types as QEMU writes them."""

    @abc.abstractmethod
    async def qom_get(self, path: str, prop: str) -> Any:
        """A QOM property's value (a JSON value)."""

    async def objects(self) -> frozenset[str]:
        """The ids of the user-created objects (-object, object_add)."""
        return frozenset(await self.qom_list("/objects"))

    @abc.abstractmethod
    async def migrate_options(self) -> frozenset[str]:
        """Which of migrate's options this QEMU has: a subset of blk, inc, resume."""

    @abc.abstractmethod
    async def block_devices(self) -> tuple[BlockDevice, ...]:
        """Every drive, with its medium and the backing chain under it (empty drives included)."""

    @abc.abstractmethod
    async def block_jobs(self) -> tuple[BlockJob, ...]:
        """The block jobs running (mirrors, commits...) and those ended but not yet dismissed."""

    # -- typed actions -----------------------------------------------------------------------
    def refuse_setting(self, kind: str, name: str) -> None:
        """Raise (one line) when the user's ``migrate_set_*`` of the ``kind`` ("capability" or
        "parameter") ``name`` cannot be done on this guest now; QEMU takes them all."""

    @abc.abstractmethod
    async def set_capabilities(self, caps: Mapping[str, bool]) -> None:
        """Turn migration capabilities (QEMU's names) on or off."""

    @abc.abstractmethod
    async def set_parameters(self, params: Mapping[str, ParamValue]) -> None:
        """Set migration parameters (QEMU's names); sizes and bandwidths in bytes (per second)."""

    @abc.abstractmethod
    async def migrate(self, uri: str, *, blk: bool = False, inc: bool = False, resume: bool = False) -> None:
        """Start an outgoing migration to ``uri``, detached: it returns once QEMU took the command."""

    @abc.abstractmethod
    async def migrate_incoming(self, uri: str) -> None:
        """Listen on ``uri`` for the incoming migration (a QEMU started with ``-incoming defer``)."""

    @abc.abstractmethod
    async def migrate_cancel(self) -> None: ...

    @abc.abstractmethod
    async def migrate_pause(self) -> None:
        """Pause a postcopy migration (it can be recovered)."""

    @abc.abstractmethod
    async def migrate_continue(self, state: str) -> None:
        """Go on from a paused migration state (``pre-switchover``)."""

    @abc.abstractmethod
    async def start_postcopy(self) -> None: ...

    @abc.abstractmethod
    async def migrate_recover(self, uri: str) -> None:
        """On the destination: listen on ``uri`` to recover a paused postcopy migration."""

    @abc.abstractmethod
    async def start_dirty_rate(self, seconds: float, mode: str | None = None,
                               sample_pages: int | None = None) -> None:
        """Start measuring the dirty rate over ``seconds`` (calc-dirty-rate) in ``mode`` (None: QEMU's
        page sampling, reading ``sample_pages`` per GiB: QEMU's default when None); ``dirty_rate``
        reads it. Windows under 1 s and modes: see ``dirty_rate_means``."""

    @abc.abstractmethod
    async def dirty_rate_means(self) -> DirtyRateMeans:
        """Which calc-dirty-rate modes and windows this guest's QEMU offers, and can use safely."""

    async def measure_dirty_rate(self, seconds: float, mode: str | None = None,
                                 sample_pages: int | None = None) -> DirtyRate:
        """Measure how fast the guest dirties memory over ``seconds``: bytes/s of the distinct pages
        dirtied in that window. Raises MonitorTimeout when no result comes."""
        await self.start_dirty_rate(seconds, mode, sample_pages)
        bound = seconds + DIRTY_RATE_SLACK
        try:
            async with asyncio.timeout(bound):
                await asyncio.sleep(seconds)
                while True:
                    info = await self.dirty_rate()
                    if info.measured and info.bytes_per_s is not None:
                        return DirtyRate(info.bytes_per_s, seconds, time.time(), info.mode or mode or "page-sampling",
                                         info.sample_pages or None)
                    await asyncio.sleep(0.1)
        except TimeoutError:
            raise MonitorTimeout(f"no dirty-rate result within {bound:g} s", guest=self.name) from None

    async def page_addresses(self, count: int, *, seed: int | None = None) -> list[int]:
        """``count`` random guest-physical page addresses in the guest's RAM. The RAM's ranges come from
        ``info mtree -f``, or the usual x86 layout when that cannot be read, so that no device register
        is read."""
        if count <= 0:
            raise CommandFailed(f"cannot sample {count} pages: give a positive count", guest=self.name)
        ram = await self.ram_size()
        try:
            ranges = pagesample.ram_ranges(await self.hmp("info mtree -f", PAGE_SAMPLE_TIMEOUT), ram)
        except CommandFailed as e:
            log.info("%s: info mtree -f failed (%s): the usual x86 layout is assumed", self.name, e)
            ranges = []
        if not ranges:
            ranges = pagesample.usual_ranges(ram)
        return pagesample.pick_pages(ranges, count, random.Random(seed))

    async def read_pages(self, addresses: list[int]) -> list[bytes]:
        """The bytes of the guest pages at ``addresses`` (``xp``, through HMP on either protocol)."""
        pages = []
        for address in addresses:
            dump = await self.hmp(f"xp /{pagesample.WORDS}gx {address:#x}")
            try:
                pages.append(pagesample.page_bytes(dump))
            except ValueError as e:
                raise CommandFailed(f"reading the page at {address:#x}: {e}", guest=self.name) from None
        return pages

    async def sample_pages(self, count: int, *, seed: int | None = None) -> PageSample:
        """Read ``count`` random pages of the guest's RAM and say how many are all zero and how well
        the others compress."""
        addresses = await self.page_addresses(count, seed=seed)
        zero = raw = packed = 0
        for data in await self.read_pages(addresses):
            if not any(data):
                zero += 1
            else:
                raw += len(data)
                packed += pagesample.compressed_size(data)
        return PageSample(pages=len(addresses), zero_pages=zero, page_size=pagesample.PAGE,
                          ram_bytes=await self.ram_size(), compressed_ratio=packed / raw if raw else None,
                          when=time.time())

    @abc.abstractmethod
    async def object_add(self, qom_type: str, object_id: str, props: Mapping[str, ParamValue]) -> None: ...

    @abc.abstractmethod
    async def object_del(self, object_id: str) -> None: ...

    @abc.abstractmethod
    async def device_del(self, device_id: str) -> None:
        """Ask the guest to release a device (DEVICE_DELETED says when it has, where events arrive)."""

    # block devices, NBD and mirrors: what the disk copy (migrate --copy-storage) sends
    @abc.abstractmethod
    async def nbd_server_start(self, server: NbdServer) -> None:
        """Start the guest's NBD server, listening at ``server``."""

    @abc.abstractmethod
    async def nbd_server_stop(self) -> None:
        """Stop the NBD server; its exports go with it."""

    @abc.abstractmethod
    async def nbd_export(self, node_name: str, name: str, *, writable: bool) -> None:
        """Export the block node ``node_name`` as ``name`` on the running NBD server."""

    @abc.abstractmethod
    async def blockdev_add_nbd(self, node_name: str, server: NbdServer, export: str) -> None:
        """Add a block node ``node_name`` that is an NBD client of ``export`` on ``server``."""

    @abc.abstractmethod
    async def blockdev_del(self, node_name: str) -> None: ...

    @abc.abstractmethod
    async def block_nodes(self) -> tuple[str, ...]:
        """The node names of the named block nodes."""

    @abc.abstractmethod
    async def blockdev_mirror(self, job_id: str, node_name: str, target: str, *, sync: str, speed: int = 0,
                              write_blocking: bool = False) -> None:
        """Mirror the node ``node_name`` into the node ``target`` as job ``job_id``. ``sync``: full (the
        whole disk) or top (the top image only); ``speed``: bytes/s, 0 unlimited; ``write_blocking``: the
        guest's writes reach the target before they complete (where QEMU's mirror has copy-mode)."""

    @abc.abstractmethod
    async def drive_mirror(self, job_id: str, node_name: str, target: str, *, target_format: str, sync: str,
                           speed: int = 0, write_blocking: bool = False) -> None:
        """Mirror the node ``node_name`` into the existing image ``target`` (a file name or an NBD URI) of
        ``target_format``, for a QEMU without blockdev-mirror; the rest as ``blockdev_mirror``."""

    @abc.abstractmethod
    async def block_job_set_speed(self, job_id: str, speed: int) -> None:
        """Change a block job's rate limit (bytes/s, 0 unlimited)."""

    @abc.abstractmethod
    async def block_job_cancel(self, job_id: str, *, force: bool = False) -> None:
        """Cancel a block job; a ready mirror cancelled without ``force`` completes with a consistent copy."""

    @abc.abstractmethod
    async def stop(self) -> None: ...

    @abc.abstractmethod
    async def cont(self) -> None: ...

    @abc.abstractmethod
    async def system_reset(self) -> None: ...

    @abc.abstractmethod
    async def quit(self) -> None:
        """End the guest's QEMU (it may close the monitor before answering: Disconnected)."""

    # HMP's savevm/loadvm/delvm, which every monitor can send; a monitor with better means overrides them
    async def save_snapshot(self, tag: str, *, replace: bool, progress: Progress) -> None:
        """Save the guest's state as ``tag`` (``replace``: a snapshot ``tag`` exists and goes first)."""
        await with_ticker(progress, f"saving {tag!r}", self.hmp(f"savevm {hmptext.quote(tag)}", SNAPSHOT_TIMEOUT))

    async def load_snapshot(self, tag: str, *, progress: Progress) -> None:
        await with_ticker(progress, f"loading {tag!r}", self.hmp(f"loadvm {hmptext.quote(tag)}", SNAPSHOT_TIMEOUT))

    async def delete_snapshot(self, tag: str, *, progress: Progress) -> None:
        await self.hmp(f"delvm {hmptext.quote(tag)}", SNAPSHOT_TIMEOUT)

    def __repr__(self) -> str:
        state = "connected" if self.connected else "closed"
        return f"<{type(self).__name__} {self.name} {self.address} {state}>"


async def with_ticker(progress: Progress, what: str, coro: Any) -> Any:
    """Await ``coro`` and report progress every second while it runs (for blocking commands)."""
    start = time.monotonic()
    task = asyncio.ensure_future(coro)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=1.0)
            if done:
                return task.result()
            progress(f"{what}... {time.monotonic() - start:.0f} s")
    finally:
        if not task.done():
            task.cancel()


def check_unix_target(address: Address) -> None:
    """A clear reason for unix paths that cannot be a monitor socket, before trying to connect."""
    if address.kind is not Kind.UNIX or address.ssh is not None:
        return
    assert address.path is not None
    try:
        st = os.stat(address.path)
    except FileNotFoundError:
        raise ConnectFailed(f"{address}: no such socket (is the guest running, and the path right?)") from None
    except OSError as e:
        raise ConnectFailed(f"{address}: {e.strerror}") from None
    if not stat.S_ISSOCK(st.st_mode):
        kind = "a directory" if stat.S_ISDIR(st.st_mode) else "a regular file" if stat.S_ISREG(st.st_mode) else "not a socket"
        raise ConnectFailed(f"{address}: {address.path} is {kind}, not a monitor socket")


async def held_elsewhere(address: Address, default: str) -> str:
    """Why a local unix monitor does not answer: the process holding it, when it can be found, else ``default``."""
    if address.kind is not Kind.UNIX or address.ssh is not None or address.path is None:
        return default
    found = await holders(address.path)
    if not found:
        return default
    who = ", ".join(str(h) for h in found)
    return (f"{address}: the monitor is held by {who}: detach it there, or give the guest a second "
            "monitor (QEMU serves one client per monitor) and attach that")


def make_monitor(name: str, address: Address, **kw: Any) -> Monitor:
    """A not-yet-connected monitor of the right protocol for ``address``."""
    if address.protocol is Protocol.LIBVIRT:
        from kvmshell.core.monitor.libvirt import LibvirtMonitor
        return LibvirtMonitor(name, address, **kw)
    if address.protocol is Protocol.QMP:
        from kvmshell.core.monitor.qmp import QmpMonitor
        return QmpMonitor(name, address, **kw)
    from kvmshell.core.monitor.hmp import HmpMonitor
    return HmpMonitor(name, address, **kw)


async def open_monitor(name: str, address: Address, **kw: Any) -> Monitor:
    mon = make_monitor(name, address, **kw)
    await mon.connect()
    return mon
