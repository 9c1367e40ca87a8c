"""QMP through ``qemu.qmp.QMPClient``: the one module that imports qemu.qmp.

Events are handed on as qemu.qmp reads them (``_Forwarder``: no listener keeps them) and fanned out
to subscribers. A watcher notices when QEMU goes away, awaits ``disconnect()`` (qemu.qmp needs it) and marks the monitor closed.
A command written as QEMU exits does not cost what QEMU sent before it went (``_Client``).
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections.abc import Callable, Mapping
from typing import Any

from qemu.qmp import ConnectError, EventListener, ExecuteError, Message, QMPClient, QMPError, Runstate

from kvmshell.core.values import hmptext
from kvmshell.core.values.address import Kind, Protocol, held_by_libvirt
from kvmshell.core.values.models import (
    BlockDevice, BlockJob, Capabilities, DirtyRateInfo, DirtyRateMeans, Event, MigrationInfo, MigrationParameters, NbdServer,
    ParamValue, QemuVersion, Snapshot, Status,
)
from kvmshell.core.monitor.base import (
    SNAPSHOT_TIMEOUT, Features, Monitor, Progress, check_unix_target, clean_hmp_line, held_elsewhere,
    start_when_incoming_ended,
)
from kvmshell.core.hosts.ssh.forward import SocketBridge
from kvmshell.core.hosts.streams import open_socket
from kvmshell.errors import CommandFailed, ConnectFailed, Disconnected, KvmError, MonitorTimeout

log = logging.getLogger(__name__)


SHORTEST_MS_WINDOW = 0.25       # seconds: the short window taken where calc-dirty-rate has calc-time-unit


def _reason(e: BaseException) -> str:
    """Why a qemu.qmp connect failed, for a user: a socket problem, or a peer that is not QMP."""
    inner = getattr(e, "exc", None) or e
    if isinstance(inner, FileNotFoundError):
        return "no such socket"
    if isinstance(inner, ConnectionRefusedError):
        return "connection refused (nothing listening there)"
    if isinstance(inner, (EOFError, ConnectionResetError)):
        return "the peer closed the connection during the QMP greeting (not QEMU, or the monitor is busy)"
    if isinstance(inner, OSError):
        return inner.strerror or str(inner)
    detail = getattr(inner, "error_message", None) or str(inner) or type(inner).__name__
    return f"not a QMP monitor: no valid greeting ({detail[:120]})"


def _socket_address(server: NbdServer) -> dict[str, str]:
    """QMP's SocketAddress of an NBD server (blockdev-add's ``server``)."""
    if server.path is not None:
        return {"type": "unix", "path": server.path}
    return {"type": "inet", "host": str(server.host), "port": str(server.port)}


def _none(_event: Message) -> bool:
    return False


class _Forwarder(EventListener):
    """Hands each event on as it arrives. qemu.qmp's ``EventListener`` keeps every event it heard in a
    history list for the connection's life (and queues it until read): on a monitor attached for weeks
    that grows without bound, so this one keeps none."""

    def __init__(self, deliver: Callable[[Message], None]) -> None:
        super().__init__()
        self._deliver = deliver

    async def put(self, event: Message) -> None:
        self._deliver(event)


class _Client(QMPClient):
    """qemu.qmp's client, but a write to a QEMU that has gone does not drop what QEMU sent before it went.

    QEMU writes SHUTDOWN and closes the monitor as it exits. A command written after that close fails
    (EPIPE), and asyncio's transport answers a failed write by dropping its reader at once, unread data
    and all: the SHUTDOWN was lost. Here such a write is let go; the reader reads to the end of what QEMU
    sent, and the disconnect at its end fails the command (Disconnected)."""

    def _do_send(self, msg: Message) -> None:
        writer = self._writer
        assert writer is not None
        data = bytes(msg)
        sock = writer.get_extra_info("socket")
        if sock is None or writer.transport.get_write_buffer_size():
            writer.write(data)                    # behind bytes the transport holds: keep their order
            return
        try:
            sent = os.write(sock.fileno(), data)  # the socket is non-blocking (asyncio's)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except (BrokenPipeError, ConnectionResetError) as e:
            log.debug("%s: not written, QEMU has closed the monitor (%s)", self.name, e)
            return
        if sent < len(data):
            writer.write(data[sent:])


class QmpMonitor(Monitor):
    protocol = Protocol.QMP
    delivers_events = True

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self._client: QMPClient | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._bridge: SocketBridge | None = None     # to a monitor on another host, through SSH

    # -- life cycle --------------------------------------------------------------------------
    async def connect(self) -> None:
        held = held_by_libvirt(self.address)
        if held is not None:
            raise ConnectFailed(held, guest=self.name)
        try:
            check_unix_target(self.address)
        except ConnectFailed as e:
            raise ConnectFailed(e.message, guest=self.name) from None
        target: str | tuple[str, int] | socket.socket
        if self.address.ssh is not None:
            try:
                self._bridge = await open_socket(self.address, self.connect_timeout, self._host_pool())
            except KvmError as e:
                await self._release_hosts()
                raise e.for_guest(self.name) from None
            target = self._bridge.sock
        elif self.address.kind is Kind.UNIX:
            assert self.address.path is not None
            target = self.address.path
        else:
            assert self.address.host is not None and self.address.port is not None
            target = (self.address.host, self.address.port)
        client = _Client(self.name)
        try:
            async with asyncio.timeout(self.connect_timeout):
                await client.connect(target)
        except TimeoutError:
            await self._discard(client)
            await self._drop_bridge()
            raise ConnectFailed(await held_elsewhere(
                self.address, f"{self.address}: no QMP greeting within {self.connect_timeout:g} s: another client "
                "holds this monitor (QEMU serves one at a time), or the peer is not QEMU"), guest=self.name) from None
        except ConnectError as e:
            await self._discard(client)
            lost = self._bridge.eof_reason if self._bridge else None
            await self._drop_bridge()
            raise ConnectFailed(f"{self.address}: {lost or _reason(e)}", guest=self.name) from None
        except (QMPError, OSError, EOFError) as e:
            await self._discard(client)
            await self._drop_bridge()
            raise ConnectFailed(f"{self.address}: {e}", guest=self.name) from None
        self._client = client
        greeting = client.greeting
        if greeting is not None:
            self.version = QemuVersion.from_qmp(greeting.QMP.version)
        client.events.event_filter = _none             # the default listener: would queue for no reader
        client.register_listener(_Forwarder(self._on_event))
        self._mark_open()
        self._tasks = [
            asyncio.create_task(self._watch(client), name=f"qmp-watch-{self.name}"),
        ]
        try:
            commands = await self.execute("query-commands")
            hmp_help = await self.hmp("help")
        except Exception:
            await self.close()
            raise
        self.features = Features(frozenset(c["name"] for c in commands), hmptext.parse_help(hmp_help))

    async def _drop_bridge(self) -> None:
        bridge, self._bridge = self._bridge, None
        if bridge is not None:
            await bridge.aclose()
        await self._release_hosts()

    @staticmethod
    async def _discard(client: QMPClient) -> None:
        try:
            await client.disconnect()
        except (QMPError, OSError, EOFError):
            pass
        except AssertionError:      # qemu.qmp's own state check, when its reader tore down first (QEMU quit)
            log.debug("%s: qemu.qmp's disconnect found its connection torn down already", client.name)

    def _on_event(self, msg: Message) -> None:
        ts = msg.get("timestamp", {})
        when = ts.get("seconds", 0) + ts.get("microseconds", 0) / 1e6 if ts else None
        try:
            self._emit(str(msg["event"]), dict(msg.get("data", {})), when)
        except Exception:             # a subscriber's bug must not end qemu.qmp's reader (the connection)
            log.exception("%s: an event handler failed on %s", self.name, msg.get("event"))

    async def _watch(self, client: QMPClient) -> None:
        """Wait until qemu.qmp starts disconnecting (QEMU gone, or us), then finish the job."""
        while client.runstate not in (Runstate.DISCONNECTING, Runstate.IDLE):
            await client.runstate_changed()
        reason = "monitor closed the connection"
        try:
            await client.disconnect()
        except (QMPError, OSError, EOFError) as e:
            reason = f"monitor connection lost ({type(e).__name__}: {e})"
        if self._bridge is not None and self._bridge.eof_reason:
            reason = self._bridge.eof_reason
        if self.connected:
            self._mark_closed(reason)
            self._emit("kvmshell.DISCONNECTED", {"reason": reason})

    async def close(self) -> None:
        self._mark_closed("closed by kvmshell")
        client, self._client = self._client, None
        if client is not None:
            await self._discard(client)
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            try:
                await task
            except asyncio.CancelledError:
                pass
        self._tasks = []
        await self._drop_bridge()

    # -- commands ----------------------------------------------------------------------------
    async def execute(self, command: str, arguments: Mapping[str, Any] | None = None,
                      timeout: float | None = None) -> Any:
        client = self._client
        if client is None or not self.connected:
            raise Disconnected(f"{self.address}: not connected ({self.disconnect_reason})", guest=self.name)
        timeout = timeout or self.timeout
        try:
            async with asyncio.timeout(timeout):
                return await client.execute(command, dict(arguments) if arguments else None)
        except ExecuteError as e:
            raise CommandFailed(f"{command}: {e.error.error.desc}", guest=self.name) from None
        except TimeoutError:
            raise MonitorTimeout(f"{command}: no answer within {timeout:g} s", guest=self.name) from None
        except (QMPError, OSError, EOFError) as e:
            raise Disconnected(f"{command}: monitor connection lost ({e})", guest=self.name) from None

    async def hmp(self, line: str, timeout: float | None = None) -> str:
        line = clean_hmp_line(line, self.name)
        output = await self.execute("human-monitor-command", {"command-line": line}, timeout)
        output = hmptext.strip_ansi(str(output)).replace("\r\n", "\n").rstrip("\n")
        error = hmptext.error_in(output)
        if error is not None:
            raise CommandFailed(error, guest=self.name)
        return output

    async def status(self) -> Status:
        return Status.from_qmp(await self.execute("query-status"))

    async def migration(self) -> MigrationInfo:
        return MigrationInfo.from_qmp(await self.execute("query-migrate"))

    async def migrate_parameters(self) -> MigrationParameters:
        return MigrationParameters.from_qmp(await self.execute("query-migrate-parameters"))

    async def migrate_capabilities(self) -> Capabilities:
        return Capabilities.from_qmp(await self.execute("query-migrate-capabilities"))

    async def snapshots(self) -> tuple[Snapshot, ...]:
        """Snapshots present on every writable disk (what `info snapshots` lists first)."""
        per_disk: list[dict[str, Snapshot]] = []
        for dev in await self.execute("query-block"):
            inserted = dev.get("inserted")
            if not inserted or inserted.get("ro"):
                continue
            snaps = inserted.get("image", {}).get("snapshots", [])
            per_disk.append({s.tag: s for s in map(Snapshot.from_qmp, snaps)})
        if not per_disk:
            return ()
        common = set(per_disk[0]).intersection(*per_disk[1:])
        return tuple(s for s in per_disk[0].values() if s.tag in common)

    async def dirty_rate(self) -> DirtyRateInfo:
        return DirtyRateInfo.from_qmp(await self.execute("query-dirty-rate"))

    async def vcpu_count(self) -> int:
        return max(1, len(await self.execute("query-cpus-fast")))

    async def ram_size(self) -> int:
        return int((await self.execute("query-memory-size-summary"))["base-memory"])

    async def uses_kvm(self) -> bool:
        return bool((await self.execute("query-kvm")).get("enabled"))

    async def qom_list(self, path: str) -> dict[str, str]:
        return {str(e["name"]): str(e.get("type", "")) for e in await self.execute("qom-list", {"path": path})}

    async def qom_get(self, path: str, prop: str) -> Any:
        return await self.execute("qom-get", {"path": path, "property": prop})

    async def migrate_options(self) -> frozenset[str]:
        return frozenset(await self.command_args("migrate")) & {"blk", "inc", "resume"}

    async def block_devices(self) -> tuple[BlockDevice, ...]:
        return tuple(BlockDevice.from_qmp(d) for d in await self.execute("query-block"))

    async def block_jobs(self) -> tuple[BlockJob, ...]:
        return tuple(BlockJob.from_qmp(j) for j in await self.execute("query-block-jobs"))

    # -- typed actions -----------------------------------------------------------------------
    async def set_capabilities(self, caps: Mapping[str, bool]) -> None:
        await self.execute("migrate-set-capabilities",
                           {"capabilities": [{"capability": k, "state": v} for k, v in caps.items()]})

    async def set_parameters(self, params: Mapping[str, ParamValue]) -> None:
        await self.execute("migrate-set-parameters", dict(params))

    async def migrate(self, uri: str, *, blk: bool = False, inc: bool = False, resume: bool = False) -> None:
        args: dict[str, Any] = {"uri": uri}
        args |= {name: True for name, on in (("blk", blk), ("inc", inc), ("resume", resume)) if on}
        await start_when_incoming_ended(lambda: self.execute("migrate", args))

    async def migrate_incoming(self, uri: str) -> None:
        await self.execute("migrate-incoming", {"uri": uri})

    async def migrate_cancel(self) -> None:
        await self.execute("migrate_cancel")

    async def migrate_pause(self) -> None:
        await self.execute("migrate-pause")

    async def migrate_continue(self, state: str) -> None:
        await self.execute("migrate-continue", {"state": state})

    async def start_postcopy(self) -> None:
        await self.execute("migrate-start-postcopy")

    async def migrate_recover(self, uri: str) -> None:
        await self.execute("migrate-recover", {"uri": uri})

    async def start_dirty_rate(self, seconds: float, mode: str | None = None,
                               sample_pages: int | None = None) -> None:
        args: dict[str, Any] = {"calc-time": int(seconds)}
        if seconds != int(seconds) or seconds < 1:
            args = {"calc-time": max(1, round(seconds * 1000)), "calc-time-unit": "millisecond"}
        if mode is not None and mode != "page-sampling":
            args["mode"] = mode
        elif sample_pages is not None:
            args["sample-pages"] = sample_pages
        await self.execute("calc-dirty-rate", args)

    async def dirty_rate_means(self) -> DirtyRateMeans:
        args = await self.command_args("calc-dirty-rate")
        shortest = SHORTEST_MS_WINDOW if "calc-time-unit" in args else 1.0
        if "mode" not in args:
            return DirtyRateMeans(("page-sampling",), shortest, "this QEMU has page sampling only")
        if not await self.uses_kvm():
            # QEMU 7.2 under TCG dies (SIGSEGV) on calc-dirty-rate mode=dirty-bitmap: never ask it there
            return DirtyRateMeans(("page-sampling",), shortest, "the dirty-bitmap mode needs KVM; this guest runs "
                                                                "without it")
        return DirtyRateMeans(("dirty-bitmap", "page-sampling"), shortest)

    async def object_add(self, qom_type: str, object_id: str, props: Mapping[str, ParamValue]) -> None:
        await self.execute("object-add", {"qom-type": qom_type, "id": object_id, **props})

    async def object_del(self, object_id: str) -> None:
        await self.execute("object-del", {"id": object_id})

    async def device_del(self, device_id: str) -> None:
        await self.execute("device_del", {"id": device_id})

    async def nbd_server_start(self, server: NbdServer) -> None:
        flat = _socket_address(server)
        kind = flat.pop("type")
        args: dict[str, Any] = {"addr": {"type": kind, "data": flat}}          # the legacy form
        if server.tls_creds:
            args["tls-creds"] = server.tls_creds
        if server.tls_authz:
            args["tls-authz"] = server.tls_authz
        await self.execute("nbd-server-start", args)

    async def nbd_server_stop(self) -> None:
        await self.execute("nbd-server-stop")

    async def nbd_export(self, node_name: str, name: str, *, writable: bool) -> None:
        if self.features.has_qmp("block-export-add"):
            await self.execute("block-export-add", {"type": "nbd", "id": name, "node-name": node_name, "name": name,
                                                    "writable": writable})
        else:                                   # before QEMU 5.2
            await self.execute("nbd-server-add", {"device": node_name, "name": name, "writable": writable})

    async def blockdev_add_nbd(self, node_name: str, server: NbdServer, export: str) -> None:
        args: dict[str, Any] = {"driver": "nbd", "node-name": node_name, "server": _socket_address(server),
                                "export": export}
        if server.tls_creds:
            args["tls-creds"] = server.tls_creds
            if server.tls_hostname:
                args["tls-hostname"] = server.tls_hostname
        await self.execute("blockdev-add", args)

    async def blockdev_del(self, node_name: str) -> None:
        await self.execute("blockdev-del", {"node-name": node_name})

    async def block_nodes(self) -> tuple[str, ...]:
        nodes = await self.execute("query-named-block-nodes", {"flat": True})
        return tuple(n["node-name"] for n in nodes if n.get("node-name"))

    @staticmethod
    def _mirror_args(job_id: str, node_name: str, sync: str, speed: int, write_blocking: bool) -> dict[str, Any]:
        args: dict[str, Any] = {"job-id": job_id, "device": node_name, "sync": sync}
        if write_blocking:
            args["copy-mode"] = "write-blocking"
        if speed:
            args["speed"] = speed
        return args

    async def blockdev_mirror(self, job_id: str, node_name: str, target: str, *, sync: str, speed: int = 0,
                              write_blocking: bool = False) -> None:
        await self.execute("blockdev-mirror",
                           self._mirror_args(job_id, node_name, sync, speed, write_blocking) | {"target": target})

    async def drive_mirror(self, job_id: str, node_name: str, target: str, *, target_format: str, sync: str,
                           speed: int = 0, write_blocking: bool = False) -> None:
        await self.execute("drive-mirror", self._mirror_args(job_id, node_name, sync, speed, write_blocking) | {
            "target": target, "format": target_format, "mode": "existing"})

    async def block_job_set_speed(self, job_id: str, speed: int) -> None:
        await self.execute("block-job-set-speed", {"device": job_id, "speed": speed})

    async def block_job_cancel(self, job_id: str, *, force: bool = False) -> None:
        await self.execute("block-job-cancel", {"device": job_id} | ({"force": True} if force else {}))

    async def stop(self) -> None:
        await self.execute("stop")

    async def cont(self) -> None:
        await self.execute("cont")

    async def system_reset(self) -> None:
        await self.execute("system_reset")

    async def quit(self) -> None:
        await self.execute("quit")

    # -- snapshots: QMP jobs where this QEMU has them (else HMP's savevm through the base) ---------
    def _has_jobs(self, command: str) -> bool:
        return self.features.has_qmp(command) and self.features.has_qmp("query-jobs")

    async def _snapshot_nodes(self) -> list[str]:
        """Node names of the writable disks that can hold snapshots (what snapshot-save needs)."""
        nodes = [d.node_name for d in await self.block_devices()
                 if d.writable and d.image is not None and d.image.format == "qcow2" and d.node_name]
        if not nodes:
            raise CommandFailed("no writable qcow2 disk can hold a snapshot (savevm needs one)", guest=None)
        return nodes

    async def save_snapshot(self, tag: str, *, replace: bool, progress: Progress) -> None:
        if not self._has_jobs("snapshot-save"):
            return await super().save_snapshot(tag, replace=replace, progress=progress)
        nodes = await self._snapshot_nodes()
        if replace:
            await self._run_job("snapshot-delete", {"tag": tag, "devices": nodes}, f"deleting old {tag!r}", progress)
        await self._run_job("snapshot-save", {"tag": tag, "vmstate": nodes[0], "devices": nodes}, f"saving {tag!r}",
                            progress)

    async def load_snapshot(self, tag: str, *, progress: Progress) -> None:
        if not self._has_jobs("snapshot-load"):
            return await super().load_snapshot(tag, progress=progress)
        nodes = await self._snapshot_nodes()
        await self._run_job("snapshot-load", {"tag": tag, "vmstate": nodes[0], "devices": nodes}, f"loading {tag!r}",
                            progress)

    async def delete_snapshot(self, tag: str, *, progress: Progress) -> None:
        if not self._has_jobs("snapshot-delete"):
            return await super().delete_snapshot(tag, progress=progress)
        await self._run_job("snapshot-delete", {"tag": tag, "devices": await self._snapshot_nodes()},
                            f"deleting {tag!r}", progress)

    async def _run_job(self, command: str, args: Mapping[str, Any], what: str, progress: Progress,
                       timeout: float = SNAPSHOT_TIMEOUT) -> None:
        """Run a QMP job command (snapshot-save/-load/-delete) to its end, reporting progress each second;
        raise CommandFailed with the job's error. Waits on JOB_STATUS_CHANGE events, not by polling."""
        job_id = f"kvmshell-{command}-{int(time.time() * 1000)}"
        concluded = asyncio.Event()

        def on_event(ev: Event) -> None:
            if ev.name == "JOB_STATUS_CHANGE" and ev.data.get("id") == job_id and ev.data.get("status") == "concluded":
                concluded.set()

        unsubscribe = self.subscribe(on_event)
        start = time.monotonic()
        try:
            await self.execute(command, {"job-id": job_id, **args})
            async with asyncio.timeout(timeout):
                while not concluded.is_set():
                    try:
                        async with asyncio.timeout(1.0):
                            await concluded.wait()
                    except TimeoutError:
                        progress(f"{what}... {time.monotonic() - start:.0f} s")
            jobs = await self.execute("query-jobs")
            job = next((j for j in jobs if j.get("id") == job_id), {})
            await self.execute("job-dismiss", {"id": job_id})
            if job.get("error"):
                raise CommandFailed(str(job["error"]), guest=self.name)
        except TimeoutError:
            raise CommandFailed(f"{what}: not finished after {timeout:.0f} s (job {job_id} is still running)",
                                guest=self.name) from None
        finally:
            unsubscribe()
