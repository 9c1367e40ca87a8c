"""HMP, QEMU's human monitor, spoken over a unix socket, TCP or a pty.

HMP is a readline terminal: a banner, the prompt ``(qemu) ``, and every typed character echoed back
with ANSI redraws before the command's output. A reply is what follows the echoed line (its first
CR LF) up to the next prompt. Commands go one at a time. On connect, and to recover from a pty where
someone else left text behind, we synchronise with a nonce command whose error message we can
recognise: that also tells a QEMU monitor from any other peer.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import secrets
from collections.abc import Callable, Mapping
from typing import Any

from kvmshell.core.values import hmptext
from kvmshell.core.values.address import Protocol, held_by_libvirt
from kvmshell.core.values.models import (
    SIZE_PARAMETERS, BlockDevice, BlockJob, Capabilities, DirtyRateInfo, DirtyRateMeans, MigrationInfo, MigrationParameters,
    NbdServer, ParamValue, Snapshot, Status,
)
from kvmshell.core.monitor.base import (
    Features, Monitor, check_unix_target, clean_hmp_line, held_elsewhere, start_when_incoming_ended,
)
from kvmshell.core.hosts.streams import Stream, open_stream
from kvmshell.errors import (
    CommandFailed, ConnectFailed, Disconnected, KvmError, MonitorTimeout, Unsupported,
)

log = logging.getLogger(__name__)

PROMPT = b"(qemu) "
MAX_BUFFER = 4 * 1024 * 1024     # a reply larger than this is not HMP: drop the connection
_MIGRATE_FLAGS = (("-b", "blk"), ("-i", "inc"), ("-r", "resume"))


def parameter_text(name: str, value: ParamValue) -> str:
    """A migration parameter's value as ``migrate_set_parameter`` reads it back."""
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, int) and name in SIZE_PARAMETERS:
        return f"{value}B"          # HMP reads a bare number as MiB for some of them
    return hmptext.quote(str(value))


class HmpMonitor(Monitor):
    protocol = Protocol.HMP
    delivers_events = False

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self._stream: Stream | None = None
        self._buf = bytearray()
        self._data = asyncio.Event()        # set whenever bytes arrive or the stream ends
        self._eof = False
        self._overflow = False
        self._lock = asyncio.Lock()
        self._reader: asyncio.Task[None] | None = None

    # -- life cycle --------------------------------------------------------------------------
    async def connect(self) -> None:
        held = held_by_libvirt(self.address)
        if held is not None:
            raise ConnectFailed(held, guest=self.name)
        try:
            check_unix_target(self.address)
            hosts = self._host_pool() if self.address.ssh is not None else None
            self._stream = await open_stream(self.address, self.connect_timeout, hosts)
        except KvmError as e:
            await self._release_hosts()
            raise e.for_guest(self.name) from None
        self._buf.clear()
        self._eof = self._overflow = False
        self._reader = asyncio.create_task(self._read_loop(), name=f"hmp-reader-{self.name}")
        self._mark_open()
        try:
            await self._sync()
            self.version = hmptext.parse_version(await self.hmp("info version"))
            help_text = await self.hmp("help")
            self.features = Features(frozenset(), hmptext.parse_help(help_text))
        except KvmError as e:
            await self.close()
            if isinstance(e, ConnectFailed):
                raise
            raise ConnectFailed(f"{self.address}: {e.message}", guest=self.name) from None
        except ValueError as e:
            await self.close()
            raise ConnectFailed(f"{self.address}: not a QEMU HMP monitor ({e})", guest=self.name) from None

    async def close(self) -> None:
        self._mark_closed("closed by kvmshell")
        if self._reader is not None:
            self._reader.cancel()
            try:
                await self._reader
            except asyncio.CancelledError:
                pass
            self._reader = None
        if self._stream is not None:
            stream, self._stream = self._stream, None
            await stream.close()
        await self._release_hosts()

    async def _read_loop(self) -> None:
        stream = self._stream
        assert stream is not None
        try:
            while True:
                chunk = await stream.read()
                if not chunk:
                    break
                self._buf += chunk
                self._data.set()
                if len(self._buf) > MAX_BUFFER:
                    self._overflow = True
                    break
        except OSError as e:
            log.info("%s: read failed: %s", self.name, e)
        finally:
            self._eof = True
            self._data.set()
            reason = "reply too large (not an HMP monitor?)" if self._overflow else (
                getattr(stream, "eof_reason", None) or "monitor closed the connection")
            self._mark_closed(reason)
            if not self._overflow:
                self._emit("kvmshell.DISCONNECTED", {"reason": reason})

    async def _wait_until(self, found: Callable[[bytes], int | None], timeout: float, what: str) -> int:
        """Wait until ``found(buffer)`` returns an end offset; the offset."""
        try:
            async with asyncio.timeout(timeout):
                while True:
                    end = found(bytes(self._buf))
                    if end is not None:
                        return end
                    if self._overflow:
                        raise Disconnected(f"{self.address}: more than {MAX_BUFFER} bytes without a "
                                           f"prompt: not an HMP monitor", guest=self.name)
                    if self._eof:
                        raise Disconnected(f"{self.address}: connection closed while waiting for {what}",
                                           guest=self.name)
                    self._data.clear()
                    await self._data.wait()
        except TimeoutError:
            raise MonitorTimeout(f"{self.address}: no {what} within {timeout:g} s", guest=self.name) from None

    async def _sync(self) -> None:
        """Send a nonce and wait for QEMU's 'unknown command' about it, then its prompt."""
        assert self._stream is not None
        nonce = f"kvmshell_sync_{secrets.token_hex(4)}"
        pattern = re.compile(rb"unknown command: '[^'\r\n]*" + nonce.encode() + rb"'\r\n\(qemu\) ")

        def found(buf: bytes) -> int | None:
            m = pattern.search(buf)
            return m.end() if m else None

        await self._stream.write(nonce.encode() + b"\n")
        try:
            end = await self._wait_until(found, self.connect_timeout, "HMP prompt")
        except MonitorTimeout:
            raise ConnectFailed(await held_elsewhere(
                self.address, f"{self.address}: no HMP prompt within {self.connect_timeout:g} s: not a QEMU "
                "monitor, or another client holds it"), guest=self.name) from None
        except Disconnected as e:
            raise ConnectFailed(f"{e.message} (not a QEMU HMP monitor?)", guest=self.name) from None
        del self._buf[:end]

    # -- commands ----------------------------------------------------------------------------
    async def raw(self, line: str, timeout: float | None = None) -> str:
        """One command line; its output (ANSI and echo removed), errors not interpreted."""
        line = clean_hmp_line(line, self.name)
        timeout = timeout or self.timeout
        async with self._lock:
            # checked once the monitor is ours: a command before this one may have lost it (a `quit`)
            if self._stream is None or not self.connected:
                raise Disconnected(f"{self.address}: not connected ({self.disconnect_reason})", guest=self.name)
            if self._buf:
                log.debug("%s: unsolicited HMP output: %r", self.name, bytes(self._buf[:200]))
                self._buf.clear()
            await self._stream.write(line.encode() + b"\n")

            def found(buf: bytes) -> int | None:
                return len(buf) if buf.endswith(PROMPT) else None

            try:
                end = await self._wait_until(found, timeout, f"answer to {line.split()[0]!r}" if line else "prompt")
            except MonitorTimeout:
                # The reply may still come and would be taken for the next one: start afresh.
                log.info("%s: no answer to %r within %g s (so far: %r): closing the monitor (it reconnects)",
                         self.name, line, timeout, bytes(self._buf[-200:]))
                await self.close()
                raise
            reply = bytes(self._buf[:end - len(PROMPT)])
            del self._buf[:end]
        _echo, sep, output = reply.partition(b"\r\n")
        text = output.decode("utf-8", errors="replace") if sep else ""
        return hmptext.strip_ansi(text).replace("\r\n", "\n").replace("\r", "").rstrip("\n")

    async def hmp(self, line: str, timeout: float | None = None) -> str:
        output = await self.raw(line, timeout)
        error = hmptext.error_in(output)
        if error is not None:
            raise CommandFailed(error, guest=self.name)
        return output

    async def execute(self, command: str, arguments: Mapping[str, Any] | None = None,
                      timeout: float | None = None) -> Any:
        raise Unsupported(f"{self.address} is an HMP monitor: raw QMP is not available "
                          "(use `hmp LINE`, or attach the guest's QMP socket)", guest=self.name)

    async def _parsed(self, line: str, parse: Callable[[str], Any], *, check: bool = True) -> Any:
        output = await (self.hmp(line) if check else self.raw(line))
        try:
            return parse(output)
        except ValueError as e:
            raise CommandFailed(f"{line!r}: {e}", guest=self.name) from None

    async def status(self) -> Status:
        return await self._parsed("info status", hmptext.parse_status)

    async def migration(self) -> MigrationInfo:
        return await self._parsed("info migrate", hmptext.parse_migrate)

    async def migrate_parameters(self) -> MigrationParameters:
        return await self._parsed("info migrate_parameters", hmptext.parse_migrate_parameters)

    async def migrate_capabilities(self) -> Capabilities:
        return await self._parsed("info migrate_capabilities", hmptext.parse_migrate_capabilities)

    async def snapshots(self) -> tuple[Snapshot, ...]:
        # "no block device can store vmstate" is an empty list here, not a failure
        return await self._parsed("info snapshots", hmptext.parse_snapshots, check=False)

    async def dirty_rate(self) -> DirtyRateInfo:
        return await self._parsed("info dirty_rate", hmptext.parse_dirty_rate)

    async def vcpu_count(self) -> int:
        return max(1, await self._parsed("info cpus", hmptext.parse_cpu_count))

    async def ram_size(self) -> int:
        return await self._parsed("info memory_size_summary", hmptext.parse_memory_size)

    async def uses_kvm(self) -> bool:
        return "kvm support: enabled" in await self.raw("info kvm")

    async def qom_list(self, path: str) -> dict[str, str]:
        return await self._parsed(f"qom-list {path}", hmptext.parse_qom_list)

    async def qom_get(self, path: str, prop: str) -> Any:
        return await self._parsed(f"qom-get {path} {prop}", json.loads)      # QEMU prints it as JSON

    async def migrate_options(self) -> frozenset[str]:
        help_text = await self.hmp("help migrate")
        return frozenset(name for flag, name in _MIGRATE_FLAGS if flag in help_text)

    def _no_block(self, what: str) -> Unsupported:
        """HMP's `info block` has no virtual sizes nor backing formats, `info block-jobs` no job state (ready,
        busy): the block machinery is not offered over HMP rather than half-parsed."""
        return Unsupported(f"{what} needs a QMP monitor and {self.address} is HMP: attach the guest's QMP socket "
                           "(the disk copy, migrate --copy-storage, needs QMP on both guests)", guest=self.name)

    async def block_devices(self) -> tuple[BlockDevice, ...]:
        raise self._no_block("reading the block devices")

    async def block_jobs(self) -> tuple[BlockJob, ...]:
        raise self._no_block("reading the block jobs")

    # -- typed actions -----------------------------------------------------------------------
    async def set_capabilities(self, caps: Mapping[str, bool]) -> None:
        for name, on in caps.items():
            await self.hmp(f"migrate_set_capability {name} {'on' if on else 'off'}")

    async def set_parameters(self, params: Mapping[str, ParamValue]) -> None:
        for name, value in params.items():
            await self.hmp(f"migrate_set_parameter {name} {parameter_text(name, value)}")

    async def migrate(self, uri: str, *, blk: bool = False, inc: bool = False, resume: bool = False) -> None:
        wanted = {"blk": blk, "inc": inc, "resume": resume}
        opts = "".join(f" {flag}" for flag, name in _MIGRATE_FLAGS if wanted[name])
        # always detached: a blocking migrate holds the monitor
        await start_when_incoming_ended(lambda: self.hmp(f"migrate -d{opts} {uri}"))

    async def migrate_incoming(self, uri: str) -> None:
        await self.hmp(f"migrate_incoming {uri}")

    async def migrate_cancel(self) -> None:
        await self.hmp("migrate_cancel")

    async def migrate_pause(self) -> None:
        await self.hmp("migrate_pause")

    async def migrate_continue(self, state: str) -> None:
        await self.hmp(f"migrate_continue {state}")

    async def start_postcopy(self) -> None:
        await self.hmp("migrate_start_postcopy")

    async def migrate_recover(self, uri: str) -> None:
        await self.hmp(f"migrate_recover {uri}")

    async def start_dirty_rate(self, seconds: float, mode: str | None = None,
                               sample_pages: int | None = None) -> None:
        if seconds != int(seconds) or seconds < 1:
            raise Unsupported(f"a dirty-rate window of {seconds:g} s: HMP's calc_dirty_rate takes whole seconds",
                              guest=self.name)
        flag = {"dirty-bitmap": "-b ", "dirty-ring": "-r "}.get(mode or "", "")
        pages = f" {sample_pages}" if sample_pages is not None and not flag else ""
        await self.hmp(f"calc_dirty_rate {flag}{int(seconds)}{pages}")

    async def dirty_rate_means(self) -> DirtyRateMeans:
        if "[-b]" not in await self.raw("help calc_dirty_rate"):
            return DirtyRateMeans(("page-sampling",), 1.0, "this QEMU has page sampling only")
        if not await self.uses_kvm():
            # QEMU 7.2 under TCG dies (SIGSEGV) on calc_dirty_rate -b: never ask it there
            return DirtyRateMeans(("page-sampling",), 1.0, "the dirty-bitmap mode needs KVM; this guest runs "
                                                           "without it")
        return DirtyRateMeans(("dirty-bitmap", "page-sampling"), 1.0)

    async def object_add(self, qom_type: str, object_id: str, props: Mapping[str, ParamValue]) -> None:
        await self.hmp(f"object_add {hmptext.keyval({'qom-type': qom_type, 'id': object_id, **props})}")

    async def object_del(self, object_id: str) -> None:
        await self.hmp(f"object_del {object_id}")

    async def device_del(self, device_id: str) -> None:
        await self.hmp(f"device_del {device_id}")

    async def nbd_server_start(self, server: NbdServer) -> None:
        raise self._no_block("an NBD server")

    async def nbd_server_stop(self) -> None:
        raise self._no_block("an NBD server")

    async def nbd_export(self, node_name: str, name: str, *, writable: bool) -> None:
        raise self._no_block("an NBD export")

    async def blockdev_add_nbd(self, node_name: str, server: NbdServer, export: str) -> None:
        raise self._no_block("a block node")

    async def blockdev_del(self, node_name: str) -> None:
        raise self._no_block("a block node")

    async def block_nodes(self) -> tuple[str, ...]:
        raise self._no_block("reading the block nodes")

    async def blockdev_mirror(self, job_id: str, node_name: str, target: str, *, sync: str, speed: int = 0,
                              write_blocking: bool = False) -> None:
        raise self._no_block("a block mirror")

    async def drive_mirror(self, job_id: str, node_name: str, target: str, *, target_format: str, sync: str,
                           speed: int = 0, write_blocking: bool = False) -> None:
        raise self._no_block("a block mirror")

    async def block_job_set_speed(self, job_id: str, speed: int) -> None:
        raise self._no_block("a block job")

    async def block_job_cancel(self, job_id: str, *, force: bool = False) -> None:
        raise self._no_block("a block job")

    async def stop(self) -> None:
        await self.hmp("stop")

    async def cont(self) -> None:
        await self.hmp("cont")

    async def system_reset(self) -> None:
        await self.hmp("system_reset")

    async def quit(self) -> None:
        await self.hmp("quit")
