"""Byte streams to a monitor: unix socket, TCP, pty - here or on another host through SSH.

``open_stream`` gives a ``Stream`` whatever the transport (HMP speaks through it); ``open_socket``
gives a connected socket for a monitor on another host (qemu.qmp takes a socket: a local socketpair
bridged to the SSH channel). The SSH side - connections, channels, the bridge - is ``ssh``'s; which
connection serves which host is ``pool.HostPool``'s business, not this module's.
"""

from __future__ import annotations

import asyncio
import errno
import os
import termios
import tty
from typing import TYPE_CHECKING, Protocol as TypingProtocol

from kvmshell.core.hosts.ssh.forward import READ_CHUNK, SocketBridge, SshStream, describe_os_error
from kvmshell.core.values.address import Address, Kind
from kvmshell.errors import ConfigError, ConnectFailed, Disconnected

if TYPE_CHECKING:
    from kvmshell.core.hosts.ssh.connection import Channel, SshConnection
    from kvmshell.core.values.address import SshTarget


class Connector(TypingProtocol):
    """What gives a monitor the SSH connection to its host (``pool.HostPool``)."""

    async def connection(self, target: SshTarget) -> SshConnection: ...


class Stream(TypingProtocol):
    async def read(self) -> bytes:
        """Some bytes; b'' at end of stream."""

    async def write(self, data: bytes) -> None: ...

    async def close(self) -> None: ...


class SocketStream:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer

    async def read(self) -> bytes:
        try:
            return await self._reader.read(READ_CHUNK)
        except (ConnectionError, OSError):
            return b""

    async def write(self, data: bytes) -> None:
        try:
            self._writer.write(data)
            await self._writer.drain()
        except (ConnectionError, OSError) as e:
            raise Disconnected(f"write failed: {e.strerror or e}") from e

    async def close(self) -> None:
        self._writer.close()
        try:
            await self._writer.wait_closed()
        except (ConnectionError, OSError):
            pass


class PtyStream:
    """The slave side of a pty that QEMU holds the master of (``-monitor pty``), in raw mode."""

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._loop = asyncio.get_running_loop()
        self._closed = False

    async def read(self) -> bytes:
        while not self._closed:
            try:
                return os.read(self._fd, READ_CHUNK)
            except BlockingIOError:
                pass
            except OSError as e:
                if e.errno == errno.EIO:        # the master side closed: QEMU is gone
                    return b""
                raise
            ready = self._loop.create_future()
            self._loop.add_reader(self._fd, ready.set_result, None)
            try:
                await ready
            finally:
                self._loop.remove_reader(self._fd)
        return b""

    async def write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            try:
                n = os.write(self._fd, view)
                view = view[n:]
                continue
            except BlockingIOError:
                pass
            except OSError as e:
                raise Disconnected(f"write failed: {e.strerror}") from e
            ready = self._loop.create_future()
            self._loop.add_writer(self._fd, ready.set_result, None)
            try:
                await ready
            finally:
                self._loop.remove_writer(self._fd)

    async def close(self) -> None:
        if not self._closed:
            self._closed = True
            os.close(self._fd)


async def open_stream(address: Address, timeout: float, hosts: Connector | None = None) -> Stream:
    """Open a raw byte stream to a monitor. Raises ConnectFailed with the reason.

    A monitor on another host (``address.ssh``) is reached through ``hosts``' SSH connection to it.
    """
    if address.ssh is not None:
        conn, (reader, writer) = await _open_remote(address, timeout, hosts)
        return SshStream(conn, reader, writer)
    try:
        async with asyncio.timeout(timeout):
            if address.kind is Kind.UNIX:
                assert address.path is not None
                r, w = await asyncio.open_unix_connection(address.path, limit=READ_CHUNK)
                return SocketStream(r, w)
            if address.kind is Kind.TCP:
                r, w = await asyncio.open_connection(address.host, address.port, limit=READ_CHUNK)
                return SocketStream(r, w)
            return _open_pty(address)
    except TimeoutError:
        raise ConnectFailed(f"{address}: no connection within {timeout:g} s") from None
    except OSError as e:
        raise ConnectFailed(f"{address}: {describe_os_error(e)}") from None


async def open_socket(address: Address, timeout: float, hosts: Connector | None) -> SocketBridge:
    """A connected local socket whose bytes go to and from the monitor at ``address`` on another host.

    The caller owns the bridge: ``aclose()`` it after it is done with ``bridge.sock``.
    """
    conn, (reader, writer) = await _open_remote(address, timeout, hosts)
    bridge = SocketBridge(conn, reader, writer, str(address))
    try:
        await bridge.start()
    except BaseException:
        await bridge.aclose()
        raise
    return bridge


async def _open_remote(address: Address, timeout: float, hosts: Connector | None
                       ) -> tuple[SshConnection, Channel]:
    assert address.ssh is not None
    if address.kind is Kind.PTY:
        raise ConnectFailed(f"{address}: a pty on another host cannot be reached through SSH; give the guest a "
                            "unix socket monitor (-qmp unix:PATH,server=on,wait=off)")
    if hosts is None:
        raise ConfigError(f"{address}: no SSH host pool to reach {address.ssh} with")
    conn = await hosts.connection(address.ssh)
    try:
        async with asyncio.timeout(timeout):
            channel = await conn.open_channel(address)
    except TimeoutError:
        raise ConnectFailed(f"{address}: no channel to the monitor through {conn.label} within {timeout:g} s") from None
    return conn, channel


def _open_pty(address: Address) -> PtyStream:
    assert address.path is not None
    fd = os.open(address.path, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
    try:
        if not os.isatty(fd):
            raise ConnectFailed(f"{address}: {address.path} is not a terminal (pty)")
        tty.setraw(fd, termios.TCSANOW)
    except BaseException:
        os.close(fd)
        raise
    return PtyStream(fd)
