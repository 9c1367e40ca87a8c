"""Byte streams to a monitor: unix socket, TCP, pty.

``open_stream`` gives a ``Stream`` whatever the transport. QMP does not need it (qemu.qmp opens its
own sockets, see ``qmp.py``); HMP speaks through it. SSH forwarding will live here too, so this stays
the one module that knows how bytes reach a monitor.
"""

from __future__ import annotations

import asyncio
import errno
import os
import termios
import tty
from typing import Protocol as TypingProtocol

from kvmshell.core.address import Address, Kind
from kvmshell.errors import ConfigError, ConnectFailed, Disconnected

READ_CHUNK = 65536


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


def _describe_os_error(e: OSError) -> str:
    if isinstance(e, FileNotFoundError):
        return "no such file or socket"
    if isinstance(e, ConnectionRefusedError):
        return "connection refused (nothing listening there)"
    if e.errno == errno.ENOTSOCK:
        return "not a socket"
    if isinstance(e, PermissionError):
        return "permission denied"
    return e.strerror or str(e)


async def open_stream(address: Address, timeout: float) -> Stream:
    """Open a raw byte stream to a monitor. Raises ConnectFailed with the reason."""
    if address.ssh is not None:
        raise ConfigError(f"{address}: monitors on other hosts (ssh://) are not supported yet")
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
        raise ConnectFailed(f"{address}: {_describe_os_error(e)}") from None


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
