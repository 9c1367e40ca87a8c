"""Guests that libvirt manages: the ``Monitor`` over libvirt's API (with ``libvirtconn``, the only modules that touch the binding).

libvirt holds the guest's only QMP connection, so commands go through its monitor pass-through
(``libvirt_qemu.qemuMonitorCommand``: QMP as JSON, HMP with the HMP flag). That pass-through is
"unsupported" in libvirt's eyes: it marks the domain tainted (``virsh dominfo``/its log say so), which
``notice`` tells the user once. QEMU's events come through ``qemuMonitorEventRegister``, the domain's
life cycle through ``domainEventRegisterAny``; both are delivered by libvirt's default event loop, run
in one daemon thread per process and bridged to asyncio with ``call_soon_threadsafe``.

A migration of the domain goes through libvirt too (``plan_migration``, then ``migrate``): libvirt holds
the domain's job lock while it migrates, so the pass-through is refused meanwhile and everything the
migration engine asks of this monitor is answered from libvirt's calls (see "migration" below).

The binding (PyPI ``libvirt-python``, the extra ``kvmshell[libvirt]``) is imported lazily: kvmshell works
without it, and a ``libvirt:`` address then says what to install.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from xml.sax.saxutils import escape
from collections.abc import Callable, Mapping
from typing import Any

from kvmshell.core.values import hmptext
from kvmshell.core.values.address import Protocol
from kvmshell.core.values.models import (
    Capabilities, MigrationInfo, MigrationParameters, MigrationStatus, ParamValue, QemuVersion, RunState, Status,
)
from kvmshell.core.monitor.base import SNAPSHOT_TIMEOUT, Features, Progress, clean_hmp_line, with_ticker
from kvmshell.core.monitor.libvirtconn import (
    binding, host_uuid, lookup_domain,
    open_connection,
)
from kvmshell.core.monitor.libvirtmig import (
    ABORT_WAIT_S, FLAG_OF_CAP, LibvirtMigrationPlan, Migration, job_status, start_arguments, stats_info,
    still_cancelling,
)
from kvmshell.core.monitor.qmp import QmpMonitor
from kvmshell.errors import CommandFailed, ConnectFailed, Disconnected, MonitorTimeout

TAINT = ("libvirt marks the domain tainted (custom-monitor) when kvmshell sends QEMU commands through its "
         "monitor pass-through; `virsh dominfo` and the domain's log say so from now on")
_LIFECYCLE = ("defined", "undefined", "started", "suspended", "resumed", "stopped", "shutdown", "pmsuspended",
              "crashed")

# what libvirt takes from the user's migrate_set_parameter: at the start (typed parameters), and
# while it migrates (migrateSetMaxSpeed, migrateSetMaxDowntime)
START_PARAMS = ("max-bandwidth", "downtime-limit", "cpu-throttle-initial", "cpu-throttle-increment")
LIVE_PARAMS = ("max-bandwidth", "max-postcopy-bandwidth", "downtime-limit")



def in_daemon_thread(fn: Callable[[], Any], name: str) -> asyncio.Future[Any]:
    """``fn()`` in a daemon thread of its own; its result as a future of the running loop. Not
    ``asyncio.to_thread``: asyncio.run() joins the default executor's threads at exit, and libvirt's
    migration call may not return for minutes after abortJob (``ABORT_WAIT_S``)."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[Any] = loop.create_future()

    def settle(result: Any, error: BaseException | None) -> None:
        if not future.done():
            future.set_exception(error) if error is not None else future.set_result(result)

    def target() -> None:
        try:
            outcome: tuple[Any, BaseException | None] = (fn(), None)
        except BaseException as e:
            outcome = (None, e)
        try:
            loop.call_soon_threadsafe(settle, *outcome)
        except RuntimeError:                     # the loop is closed: nobody waits any more
            pass
    threading.Thread(target=target, name=name, daemon=True).start()
    return future


class LibvirtMonitor(QmpMonitor):
    """QMP commands, HMP lines and events through libvirt; every typed query of ``QmpMonitor`` works
    unchanged on top of ``execute``."""

    protocol = Protocol.LIBVIRT
    delivers_events = True
    notice = TAINT
    settings_per_migration = True
    reports_start_failures_at_end = True
    setup_phase = ("libvirt has been preparing the destination", "its libvirtd has not got the domain's QEMU "
                   "running there (the domain's log on the destination, /var/log/libvirt/qemu/, says why)")

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self._conn: Any = None
        self._dom: Any = None
        self._callbacks: list[Callable[[], None]] = []
        self._plan: LibvirtMigrationPlan | None = None
        self._caps: dict[str, bool] = {}              # for the next migration (the user's and the job's)
        self._params: dict[str, ParamValue] = {}
        self._before: tuple[dict[str, ParamValue], dict[str, bool]] = ({}, {})   # QEMU's, as last read
        self._mig: Migration | None = None

    async def _call(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.to_thread(fn, *args)

    async def connect(self) -> None:
        libvirt, libvirt_qemu = binding()
        domain = str(self.address.path)
        try:
            async with asyncio.timeout(self.connect_timeout):
                self._conn = await self._call(open_connection, self.address.uri)
                self._dom = await self._call(lookup_domain, self._conn, domain)
                active = await self._call(self._dom.isActive)
        except TimeoutError:
            await self.close()
            raise ConnectFailed(f"{self.address}: libvirt did not answer within {self.connect_timeout:g} s",
                                guest=self.name) from None
        except ConnectFailed as e:
            await self.close()
            raise e.for_guest(self.name) from None
        if not active:
            await self.close()
            raise ConnectFailed(f"{self.address}: the domain is not running (start it with virsh start {domain})",
                                guest=self.name)
        loop = asyncio.get_running_loop()
        conn, dom = self._conn, self._dom

        def on_qemu(_conn: Any, _dom: Any, event: str, seconds: int, micros: int, details: Any, _opaque: Any) -> None:
            data = json.loads(details) if isinstance(details, str) and details else (details or {})
            if event == "MIGRATION" and self._mig is not None and isinstance(data, dict):
                self._mig.qemu_status = str(data.get("status", self._mig.qemu_status))
            loop.call_soon_threadsafe(self._emit, str(event), dict(data), seconds + micros / 1e6)

        def on_lifecycle(_conn: Any, _dom: Any, event: int, detail: int, _opaque: Any) -> None:
            loop.call_soon_threadsafe(self._lifecycle, event, detail)

        qemu_id = libvirt_qemu.qemuMonitorEventRegister(conn, dom, None, on_qemu, None, 0)
        self._callbacks.append(lambda: libvirt_qemu.qemuMonitorEventDeregister(conn, qemu_id))
        life_id = conn.domainEventRegisterAny(dom, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, on_lifecycle, None)
        self._callbacks.append(lambda: conn.domainEventDeregisterAny(life_id))
        self._mark_open()
        try:
            version = await self.execute("query-version")
            commands = await self.execute("query-commands")
            hmp_help = await self.hmp("help")
        except Exception:
            await self.close()
            raise
        self.version = QemuVersion.from_qmp(version)
        self.features = Features(frozenset(c["name"] for c in commands), hmptext.parse_help(hmp_help))

    def _lifecycle(self, event: int, detail: int) -> None:
        libvirt, _ = binding()
        name = _LIFECYCLE[event] if 0 <= event < len(_LIFECYCLE) else str(event)
        self._emit("libvirt.LIFECYCLE", {"event": name, "detail": detail})
        if name == "stopped" and detail == libvirt.VIR_DOMAIN_EVENT_STOPPED_FROM_SNAPSHOT:
            return               # reverting to a snapshot: libvirt starts the domain again at once
        if self._mig is not None and name in ("stopped", "undefined"):
            return               # migrated away: the migration's end says so, and its owner closes
        if name in ("stopped", "undefined") and self.connected:
            reason = f"libvirt: the domain {name}"
            self._mark_closed(reason)
            self._emit("kvmshell.DISCONNECTED", {"reason": reason})

    async def close(self) -> None:
        self._mark_closed("closed by kvmshell")
        callbacks, self._callbacks = self._callbacks, []
        conn, self._conn, self._dom = self._conn, None, None

        def release() -> None:
            for undo in callbacks:
                try:
                    undo()
                except Exception:            # the connection may be gone already
                    pass
            if conn is not None:
                try:
                    conn.close()
                except Exception:
                    pass
        await asyncio.to_thread(release)

    async def _pass_through(self, text: str, hmp: bool, what: str, timeout: float | None) -> str:
        libvirt, libvirt_qemu = binding()
        dom = self._dom
        if dom is None or not self.connected:
            raise Disconnected(f"{self.address}: not connected ({self.disconnect_reason})", guest=self.name)
        flags = libvirt_qemu.VIR_DOMAIN_QEMU_MONITOR_COMMAND_HMP if hmp else 0
        timeout = timeout or self.timeout
        try:
            async with asyncio.timeout(timeout):
                return str(await self._call(libvirt_qemu.qemuMonitorCommand, dom, text, flags))
        except TimeoutError:
            raise MonitorTimeout(f"{what}: no answer from libvirt within {timeout:g} s", guest=self.name) from None
        except libvirt.libvirtError as e:
            if e.get_error_code() in (libvirt.VIR_ERR_OPERATION_INVALID, libvirt.VIR_ERR_NO_DOMAIN):
                self._mark_closed(f"libvirt: {e.get_error_message()}")
                raise Disconnected(f"{what}: {e.get_error_message()}", guest=self.name) from None
            raise CommandFailed(f"{what}: libvirt: {e.get_error_message()}", guest=self.name) from None

    async def execute(self, command: str, arguments: Mapping[str, Any] | None = None,
                      timeout: float | None = None) -> Any:
        request: dict[str, Any] = {"execute": command}
        if arguments:
            request["arguments"] = dict(arguments)
        reply = json.loads(await self._pass_through(json.dumps(request), False, command, timeout))
        if "error" in reply:
            raise CommandFailed(f"{command}: {reply['error'].get('desc', reply['error'])}", guest=self.name)
        return reply.get("return")

    async def hmp(self, line: str, timeout: float | None = None) -> str:
        line = clean_hmp_line(line, self.name)
        output = await self._pass_through(line, True, line.split(" ", 1)[0] or "hmp", timeout)
        output = hmptext.strip_ansi(output).replace("\r\n", "\n").rstrip("\n")
        error = hmptext.error_in(output)
        if error is not None:
            raise CommandFailed(error, guest=self.name)
        return output

    # -- snapshots: libvirt's snapshot API, so that `virsh snapshot-list` agrees --------------------
    async def _libvirt(self, what: str, fn: Callable[..., Any], *args: Any, progress: Progress | None = None) -> Any:
        libvirt, _ = binding()
        if self._dom is None or not self.connected:
            raise Disconnected(f"{self.address}: not connected ({self.disconnect_reason})", guest=self.name)
        call = asyncio.wait_for(self._call(fn, *args), SNAPSHOT_TIMEOUT)
        try:
            return await (with_ticker(progress, what, call) if progress else call)
        except TimeoutError:
            raise MonitorTimeout(f"{what}: libvirt did not finish within {SNAPSHOT_TIMEOUT:g} s",
                                 guest=self.name) from None
        except libvirt.libvirtError as e:
            raise CommandFailed(f"{what}: libvirt: {e.get_error_message()}", guest=self.name) from None

    async def save_snapshot(self, tag: str, *, replace: bool, progress: Progress) -> None:
        """An internal snapshot with the memory state (libvirt's default for a running qcow2 guest)."""
        dom = self._dom
        if replace:
            await self._libvirt(f"deleting old {tag!r}", lambda: dom.snapshotLookupByName(tag).delete(0))
        xml = f"<domainsnapshot><name>{escape(tag)}</name><description>kvmshell savevm</description></domainsnapshot>"
        await self._libvirt(f"saving {tag!r}", dom.snapshotCreateXML, xml, 0, progress=progress)

    async def load_snapshot(self, tag: str, *, progress: Progress) -> None:
        dom = self._dom
        await self._libvirt(f"loading {tag!r}", lambda: dom.revertToSnapshot(dom.snapshotLookupByName(tag), 0),
                            progress=progress)

    async def delete_snapshot(self, tag: str, *, progress: Progress) -> None:
        dom = self._dom
        await self._libvirt(f"deleting {tag!r}", lambda: dom.snapshotLookupByName(tag).delete(0), progress=progress)

    # -- migration: libvirt migrates, kvmshell samples and steers ------------------------------------
    # The engine (MigrationJob) drives this monitor as any other: capabilities and parameters set
    # before the start become libvirt's flags and typed parameters, `migrate` starts libvirt's call in
    # a thread, and while it runs the status, the statistics and the levers are libvirt's calls
    # (jobStats, migrateSetMaxDowntime/Speed, migrateStartPostCopy, abortJob): the pass-through waits
    # for the domain's job lock, which the migration holds.
    async def domain_facts(self) -> dict[str, Any]:
        """The domain's name, whether it is persistent, and its host's UUID."""
        dom, conn = self._dom, self._conn
        if dom is None or not self.connected:
            raise Disconnected(f"{self.address}: not connected ({self.disconnect_reason})", guest=self.name)
        return {"name": dom.name(), "persistent": bool(await self._libvirt("isPersistent", dom.isPersistent)),
                "host_uuid": await self._libvirt("capabilities", host_uuid, conn)}

    async def domain_xml(self) -> str:
        """The running domain's XML, as libvirt has it now."""
        return str(await self._libvirt("XMLDesc", self._dom.XMLDesc, 0))

    async def disk_capacity(self, target: str) -> int:
        """The virtual size in bytes of the disk ``target`` (sda...)."""
        return int((await self._libvirt("blockInfo", self._dom.blockInfo, target))[0])

    def migrated_away(self, reason: str) -> None:
        """The domain runs elsewhere now: this monitor is closed (the fleet says why)."""
        self._mark_closed(reason)

    def plan_migration(self, plan: LibvirtMigrationPlan) -> None:
        """Where and how the next ``migrate`` goes (with the capabilities and parameters set before it)."""
        self._plan = plan

    def refuse_setting(self, kind: str, name: str) -> None:
        """What libvirt has no call for, in one line with the libvirt way: capabilities are flags of
        the start; a running migration takes only max speed and max downtime (migrateSetMaxSpeed,
        migrateSetMaxDowntime); the start takes those and auto-converge's throttle."""
        if kind == "capability":
            if self.migrating:
                raise CommandFailed(f"libvirt takes {name} only as a flag of the start of a migration (virsh "
                                    "migrate --auto-converge...): set it before `migrate`; nothing was changed",
                                    guest=self.name)
            if name not in FLAG_OF_CAP:
                raise CommandFailed(f"libvirt has no migration flag for the capability {name} (kvmshell passes "
                                    f"{', '.join(FLAG_OF_CAP)} as libvirt's flags; virsh migrate --help lists the "
                                    "others); nothing was changed", guest=self.name)
        elif name not in (LIVE_PARAMS if self.migrating else START_PARAMS):
            when = "during a migration" if self.migrating else "at the start of a migration"
            allowed = LIVE_PARAMS if self.migrating else START_PARAMS
            raise CommandFailed(f"libvirt has no call to set {name} {when} (it takes {', '.join(allowed)}: virsh "
                                "migrate-setspeed, migrate-setmaxdowntime, migrate's options); nothing was changed",
                                guest=self.name)

    @property
    def migrating(self) -> bool:
        return self._mig is not None and self._mig.final is None

    @property
    def finishing(self) -> bool:
        """QEMU completed its part and libvirt's call has not returned: libvirt resumes the domain on the
        destination (Finish) and ends the job on the source (Confirm), which took 2 s here."""
        return self.migrating and self._mig is not None and self._mig.qemu_status == "completed"

    async def set_capabilities(self, caps: Mapping[str, bool]) -> None:
        if self.migrating:
            raise CommandFailed("libvirt takes migration capabilities only at the start of a migration",
                                guest=self.name)
        for cap, on in caps.items():
            if on and cap not in FLAG_OF_CAP and cap != "events":
                raise CommandFailed(f"libvirt has no migration flag for the capability {cap}", guest=self.name)
        self._caps.update(caps)

    async def set_parameters(self, params: Mapping[str, ParamValue]) -> None:
        mig = self._mig
        if mig is None or mig.final is not None:
            self._params.update(params)          # libvirt's typed parameters at the next start
            return
        libvirt, _ = binding()
        dom = self._dom
        for name, value in params.items():
            if name == "downtime-limit":
                await self._libvirt("migrateSetMaxDowntime", dom.migrateSetMaxDowntime, int(value), 0)
            elif name == "max-bandwidth":
                await self._libvirt("migrateSetMaxSpeed", dom.migrateSetMaxSpeed, max(1, int(value) >> 20), 0)
            elif name == "max-postcopy-bandwidth":
                await self._libvirt("migrateSetMaxSpeed", dom.migrateSetMaxSpeed, max(1, int(value) >> 20),
                                    libvirt.VIR_DOMAIN_MIGRATE_MAX_SPEED_POSTCOPY)
            else:
                raise CommandFailed(f"libvirt cannot change {name} during a migration (it has no call for it): "
                                    "it stays as the migration started", guest=self.name)
            self._params[name] = value           # what `info migrate_parameters` shows

    async def migrate_parameters(self) -> MigrationParameters:
        """QEMU's, with what the next (or the running) libvirt migration takes on top; during one, QEMU's
        as last read before it (the engine reads them as it prepares)."""
        if not self.migrating:
            self._before = (dict((await super().migrate_parameters()).values), self._before[1])
        return MigrationParameters.from_qmp(self._before[0] | self._params)

    async def migrate_capabilities(self) -> Capabilities:
        if not self.migrating:
            self._before = (self._before[0], dict((await super().migrate_capabilities()).states))
        return Capabilities.from_qmp([{"capability": k, "state": v} for k, v in (self._before[1] | self._caps).items()])

    async def migrate(self, uri: str, *, blk: bool = False, inc: bool = False, resume: bool = False) -> None:
        """Start libvirt's migration to ``uri`` (the plan's) in a thread; return once libvirt runs it."""
        libvirt, _ = binding()
        plan = self._plan
        if plan is None or plan.uri != uri or blk or inc or resume:
            raise CommandFailed("a libvirt guest migrates through libvirt: to a libvirt URI, planned first",
                                guest=self.name)
        if self._dom is None or not self.connected:
            raise Disconnected(f"{self.address}: not connected ({self.disconnect_reason})", guest=self.name)
        flags, params = start_arguments(binding()[0], plan, self._caps, self._params)
        downtime = self._params.get("downtime-limit")
        mig = Migration(plan, flags, params, int(downtime) if isinstance(downtime, int) else None)
        dom = self._dom
        dconn = None if plan.p2p else await self._call(open_connection, plan.uri)

        def run() -> Any:
            peer = dconn
            try:
                if dconn is None:
                    dom.migrateToURI3(plan.uri, params, flags)
                else:
                    new = dom.migrate3(dconn, params, flags)
                try:
                    if peer is None:             # peer-to-peer: the destination keeps the completed job's figures
                        peer = libvirt.open(plan.uri)
                        new = peer.lookupByName(dom.name())
                    return new.jobStats(libvirt.VIR_DOMAIN_JOB_STATS_COMPLETED)
                except libvirt.libvirtError:
                    return {}
            finally:
                if peer is not None:
                    peer.close()
        mig.started = time.monotonic()
        self._mig = mig
        mig.task = in_daemon_thread(run, f"libvirt-migrate-{self.name}")
        mig.task.add_done_callback(lambda task: self._ended(mig, task))
        if mig.downtime_ms is not None:
            asyncio.ensure_future(self._downtime_once_running(mig))

    def _ended(self, mig: Migration, task: asyncio.Future[Any]) -> None:
        libvirt, _ = binding()
        err = task.exception() if not task.cancelled() else None
        if mig.final is not None:                # given up on after abortJob (``_abort_bounded``)
            return
        if err is None and not task.cancelled():
            stats = task.result() or {}
            info = stats_info(stats, MigrationStatus.COMPLETED) if stats.get("time_elapsed") else \
                MigrationInfo(MigrationStatus.COMPLETED, ram=mig.last.ram if mig.last else None,
                              total_time_ms=int((time.monotonic() - mig.started) * 1000))
        else:
            why = err.get_error_message() if isinstance(err, libvirt.libvirtError) else str(err or "interrupted")
            aborted = mig.aborted or (isinstance(err, libvirt.libvirtError)           # virsh domjobabort too
                                      and err.get_error_code() == libvirt.VIR_ERR_OPERATION_ABORTED)
            status = MigrationStatus.CANCELLED if aborted else MigrationStatus.FAILED
            info = MigrationInfo(status, ram=mig.last.ram if mig.last else None, error=f"libvirt: {why}")
        mig.final = info
        self._caps, self._params = {}, {}       # they went with this migration (libvirt keeps none of them)
        self._emit("MIGRATION", {"status": info.status.value})        # wakes whoever follows it

    async def _downtime_once_running(self, mig: Migration) -> None:
        """libvirt takes the downtime limit only once its migration job runs."""
        libvirt, _ = binding()
        dom = self._dom
        for _ in range(200):
            if mig.final is not None or dom is None:
                return
            try:
                stats = await self._call(dom.jobStats, 0)
                if stats.get("type", 0) != libvirt.VIR_DOMAIN_JOB_NONE:
                    await self._call(dom.migrateSetMaxDowntime, mig.downtime_ms, 0)
                    return
            except libvirt.libvirtError:
                pass
            await asyncio.sleep(0.05)

    async def _foreign_job(self) -> dict[str, Any] | None:
        """libvirt's statistics of a migration out of this domain that another client started (virsh,
        another kvmshell); None when there is none."""
        libvirt, _ = binding()
        try:
            stats = await self._call(self._dom.jobStats, 0)
        except libvirt.libvirtError:
            return None
        out = getattr(libvirt, "VIR_DOMAIN_JOB_OPERATION_MIGRATION_OUT", 5)
        if stats.get("type", 0) == libvirt.VIR_DOMAIN_JOB_NONE or stats.get("operation", out) != out:
            return None
        return dict(stats)

    async def migration(self) -> MigrationInfo:
        mig = self._mig
        if mig is not None and mig.final is not None and mig.task is not None and not mig.task.done():
            return mig.final         # given up on after abortJob: libvirt's job is still ours, not another's
        if mig is None or mig.final is not None and self.connected:
            foreign = await self._foreign_job() if self._dom is not None else None
            if foreign is not None:
                return stats_info(foreign, MigrationStatus.ACTIVE)
        if mig is None:
            return await super().migration()
        if mig.final is not None:
            return mig.final
        libvirt, _ = binding()
        stats = await self._job_stats(mig)
        if mig.final is not None:
            return mig.final
        if stats is None:
            return mig.last or MigrationInfo(MigrationStatus.SETUP)       # libvirt busy: as last read
        if not stats or stats.get("type", 0) == libvirt.VIR_DOMAIN_JOB_NONE:
            return mig.last or MigrationInfo(MigrationStatus.SETUP)
        mig.last = stats_info(stats, job_status(mig.qemu_status, stats))
        return mig.last

    async def _job_stats(self, mig: Migration) -> dict[str, Any] | None:
        """libvirt's job statistics ({} when it has none), or None when libvirt did not answer within
        2 s. One call at a time, in a daemon thread: while libvirt cancels a disk copy (``ABORT_WAIT_S``)
        it answers jobStats only when the job ends, and calls piled up behind it would fill the
        connection's request slots (5 a client) and keep kvmshell from exiting."""
        libvirt, _ = binding()
        if mig.stats_call is None or mig.stats_call.done():
            mig.stats_call = in_daemon_thread(lambda: self._dom.jobStats(0), f"libvirt-jobstats-{self.name}")
        call = mig.stats_call
        await asyncio.wait({call}, timeout=2)
        if not call.done():
            return None
        if call.exception() is not None:
            return {} if isinstance(call.exception(), libvirt.libvirtError) else None
        return dict(call.result())

    async def status(self) -> Status:
        if self._mig is None:
            return await super().status()
        libvirt, _ = binding()
        state, reason = await self._libvirt("state", self._dom.state)
        if state == libvirt.VIR_DOMAIN_RUNNING:
            return Status(True, RunState.RUNNING)
        if state == libvirt.VIR_DOMAIN_PAUSED:
            return Status(False, RunState.FINISH_MIGRATE if reason == libvirt.VIR_DOMAIN_PAUSED_MIGRATION
                          else RunState.PAUSED)
        return Status(False, RunState.POSTMIGRATE if reason == libvirt.VIR_DOMAIN_SHUTOFF_MIGRATED
                      else RunState.SHUTDOWN)

    async def migrate_cancel(self) -> None:
        mig = self._mig if self.migrating else None
        if mig is not None:
            mig.aborted = True
        elif await self._foreign_job() is None:
            raise CommandFailed("libvirt runs no migration of this domain to cancel", guest=self.name)
        await self._libvirt("abortJob", self._dom.abortJob)
        if mig is not None and mig.bound is None:
            mig.bound = asyncio.ensure_future(self._abort_bounded(mig))

    async def _abort_bounded(self, mig: Migration) -> None:
        """End kvmshell's side of an aborted migration whose libvirt call does not return within
        ``ABORT_WAIT_S`` (see there): cancelled, saying why; libvirt's call runs on in its thread."""
        assert mig.task is not None
        preparing = mig.last is None or mig.last.status is MigrationStatus.SETUP     # aborted before it moved
        await asyncio.wait({mig.task}, timeout=ABORT_WAIT_S)
        if mig.final is not None or mig.task.done():
            return
        if mig.final is None:
            disk = mig.last.disk.remaining if mig.last and mig.last.disk else None
            mig.final = MigrationInfo(MigrationStatus.CANCELLED, ram=mig.last.ram if mig.last else None,
                                      error=still_cancelling(ABORT_WAIT_S, disk, preparing=preparing))
            self._caps, self._params = {}, {}
            self._emit("MIGRATION", {"status": mig.final.status.value})

    async def migrate_continue(self, state: str) -> None:
        if self.migrating:
            raise CommandFailed("libvirt continues its own migration at the switch-over", guest=self.name)
        await super().migrate_continue(state)

    async def start_postcopy(self) -> None:
        await self._libvirt("migrateStartPostCopy", self._dom.migrateStartPostCopy, 0)

    async def migrate_pause(self) -> None:
        libvirt, _ = binding()
        flag = getattr(libvirt, "VIR_DOMAIN_ABORT_JOB_POSTCOPY", None)
        if flag is None:
            raise CommandFailed("this libvirt cannot pause a postcopy migration", guest=self.name)
        await self._libvirt("abortJob", self._dom.abortJobFlags, flag)

    async def migration_ended(self) -> MigrationInfo:
        """Wait for libvirt's call to return; how it ended."""
        mig = self._mig
        if mig is None or mig.task is None:
            return await self.migration()
        waits = {mig.task} | ({mig.bound} if mig.bound is not None else set())
        while mig.final is None:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            waits = {w for w in waits if not w.done()} or {mig.task}
        return mig.final
