"""Guests that libvirt manages: the ``Monitor`` over libvirt's API (the one module that imports libvirt).

libvirt holds the guest's only QMP connection, so commands go through its monitor pass-through
(``libvirt_qemu.qemuMonitorCommand``: QMP as JSON, HMP with the HMP flag). That pass-through is
"unsupported" in libvirt's eyes: it marks the domain tainted (``virsh dominfo``/its log say so), which
``notice`` tells the user once. QEMU's events come through ``qemuMonitorEventRegister``, the domain's
life cycle through ``domainEventRegisterAny``; both are delivered by libvirt's default event loop, run
in one daemon thread per process and bridged to asyncio with ``call_soon_threadsafe``.

The binding (PyPI ``libvirt-python``, the extra ``kvmshell[libvirt]``) is imported lazily: kvmshell works
without it, and a ``libvirt:`` address then says what to install.
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
from xml.sax.saxutils import escape
from collections.abc import Callable, Mapping
from types import ModuleType
from typing import Any

from kvmshell.core.values import hmptext
from kvmshell.core.values.address import Address, Protocol
from kvmshell.core.values.models import QemuVersion
from kvmshell.core.monitor.base import SNAPSHOT_TIMEOUT, Features, Progress, clean_hmp_line, with_ticker
from kvmshell.core.monitor.qmp import QmpMonitor
from kvmshell.errors import CommandFailed, ConnectFailed, Disconnected, MonitorTimeout

INSTALL = ("the Python binding of libvirt is not installed: pip install 'kvmshell[libvirt]' (it builds against "
           "libvirt's headers: apt-get install libvirt-dev pkg-config gcc), or run `make deps` as root")
TAINT = ("libvirt marks the domain tainted (custom-monitor) when kvmshell sends QEMU commands through its "
         "monitor pass-through; `virsh dominfo` and the domain's log say so from now on")
_STATES = ("no state", "running", "blocked", "paused", "shutting down", "shut off", "crashed", "suspended (pm)")
_LIFECYCLE = ("defined", "undefined", "started", "suspended", "resumed", "stopped", "shutdown", "pmsuspended",
              "crashed")

_modules: tuple[ModuleType, ModuleType] | None = None
_loop_lock = threading.Lock()


def binding() -> tuple[ModuleType, ModuleType]:
    """``(libvirt, libvirt_qemu)`` with libvirt's event loop running; ConnectFailed saying what to
    install when the binding is missing."""
    global _modules
    with _loop_lock:
        if _modules is None:
            try:
                import libvirt
                import libvirt_qemu
            except ImportError:
                raise ConnectFailed(INSTALL) from None
            libvirt.registerErrorHandler(lambda _ctx, _err: None, None)   # errors are raised, not printed
            libvirt.virEventRegisterDefaultImpl()      # before any connection opens

            def run() -> None:
                while True:
                    libvirt.virEventRunDefaultImpl()
            threading.Thread(target=run, name="libvirt-events", daemon=True).start()
            _modules = (libvirt, libvirt_qemu)
        return _modules


def default_uri() -> str:
    return os.environ.get("LIBVIRT_DEFAULT_URI") or "qemu:///system"


def state_name(state: int) -> str:
    return _STATES[state] if 0 <= state < len(_STATES) else f"state {state}"


def open_connection(uri: str | None) -> Any:
    """A read-write ``virConnect`` (blocking: call it in a thread); ConnectFailed with the URI and
    libvirt's reason."""
    libvirt, _ = binding()
    uri = uri or default_uri()
    try:
        return libvirt.open(uri)
    except libvirt.libvirtError as e:
        raise ConnectFailed(f"libvirt {uri}: {e.get_error_message()}") from None


def lookup_domain(conn: Any, name: str) -> Any:
    """The domain called ``name``; ConnectFailed listing those that exist on that connection."""
    libvirt, _ = binding()
    try:
        return conn.lookupByName(name)
    except libvirt.libvirtError as e:
        if e.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN:
            raise ConnectFailed(f"libvirt {conn.getURI()}: {e.get_error_message()}") from None
    names = sorted(d.name() for d in conn.listAllDomains())
    raise ConnectFailed(f"no libvirt domain {name!r} on {conn.getURI()} (domains there: "
                        f"{', '.join(names) or 'none'})")


def list_domains(uri: str | None) -> list[dict[str, Any]]:
    """Every domain on the connection: name, state, UUID, persistent (blocking)."""
    conn = open_connection(uri)
    try:
        rows = []
        for d in conn.listAllDomains():
            state, _ = d.state()
            rows.append({"name": d.name(), "state": state_name(state), "uuid": d.UUIDString(),
                         "persistent": bool(d.isPersistent()), "address": str(Address.libvirt(d.name(), uri))})
        return sorted(rows, key=lambda r: r["name"])
    finally:
        conn.close()


class LibvirtMonitor(QmpMonitor):
    """QMP commands, HMP lines and events through libvirt; every typed query of ``QmpMonitor`` works
    unchanged on top of ``execute``."""

    protocol = Protocol.LIBVIRT
    delivers_events = True
    notice = TAINT

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self._conn: Any = None
        self._dom: Any = None
        self._callbacks: list[Callable[[], None]] = []

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
