"""Byte streams through an SSH connection: a channel to a monitor as a ``Stream`` (``SshStream``) or
as a local socket (``SocketBridge``, for qemu.qmp), and a unix socket here forwarded to one on the
host (``forward_local_unix``).
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import socket
from typing import TYPE_CHECKING

from kvmshell.core.hosts.ssh.connection import CLOSE_TIMEOUT, SshConnection
from kvmshell.errors import ConnectFailed, Disconnected

if TYPE_CHECKING:
    import asyncssh
else:
    from kvmshell.core.hosts.ssh.connection import asyncssh

log = logging.getLogger(__name__)

READ_CHUNK = 65536


def describe_os_error(e: OSError) -> str:
    """How a failed connect or listen on a socket here reads in a message."""
    if isinstance(e, FileNotFoundError):
        return "no such file or socket"
    if isinstance(e, ConnectionRefusedError):
        return "connection refused (nothing listening there)"
    if e.errno == errno.ENOTSOCK:
        return "not a socket"
    if isinstance(e, PermissionError):
        return "permission denied"
    return e.strerror or str(e)


class SshStream:
    """A channel to a monitor through an SSH connection, as a ``Stream``."""

    def __init__(self, conn: SshConnection, reader: asyncssh.SSHReader[bytes],
                 writer: asyncssh.SSHWriter[bytes]) -> None:
        self._conn = conn
        self._reader = reader
        self._writer = writer

    @property
    def eof_reason(self) -> str | None:
        """Why the stream ended, when it was the SSH connection that went."""
        return None if self._conn.alive else self._conn.lost_message()

    async def read(self) -> bytes:
        try:
            return await self._reader.read(READ_CHUNK)
        except (asyncssh.Error, OSError):
            return b""

    async def write(self, data: bytes) -> None:
        try:
            self._writer.write(data)
            await self._writer.drain()
        except (asyncssh.Error, OSError) as e:
            raise Disconnected(self.eof_reason or f"write failed: {e}") from None

    async def close(self) -> None:
        self._writer.close()
        try:
            async with asyncio.timeout(CLOSE_TIMEOUT):
                await self._writer.channel.wait_closed()
        except (TimeoutError, asyncssh.Error, OSError):
            pass


class SocketBridge:
    """A local socketpair whose far end is pumped to and from an SSH channel by a task this owns."""

    def __init__(self, conn: SshConnection, reader: asyncssh.SSHReader[bytes],
                 writer: asyncssh.SSHWriter[bytes], name: str) -> None:
        self._conn = conn
        self._reader = reader
        self._writer = writer
        self._name = name
        self.sock, self._ours = socket.socketpair()
        self._local: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        self._task: asyncio.Task[None] | None = None

    @property
    def eof_reason(self) -> str | None:
        return None if self._conn.alive else self._conn.lost_message()

    async def start(self) -> None:
        self._local = await asyncio.open_connection(sock=self._ours, limit=READ_CHUNK)
        self._task = asyncio.create_task(self._run(), name=f"ssh-bridge {self._name}")

    async def _run(self) -> None:
        assert self._local is not None
        lr, lw = self._local

        async def inbound() -> None:            # monitor -> local socket
            while data := await self._reader.read(READ_CHUNK):
                lw.write(data)
                await lw.drain()

        async def outbound() -> None:           # local socket -> monitor
            while data := await lr.read(READ_CHUNK):
                self._writer.write(data)
                await self._writer.drain()

        pumps = [asyncio.create_task(inbound()), asyncio.create_task(outbound())]
        try:
            await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for p in pumps:
                p.cancel()
            for p in pumps:
                try:
                    await p
                except (asyncio.CancelledError, asyncssh.Error, OSError) as e:
                    if not isinstance(e, asyncio.CancelledError):
                        log.debug("%s: bridge pump ended: %r", self._name, e)
            lw.close()                           # the monitor client sees EOF
            self._writer.close()

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        if self._local is not None:
            self._local[1].close()
            try:
                await self._local[1].wait_closed()
            except (OSError, ConnectionError):
                pass
            self._local = None
        else:
            self._ours.close()
        self.sock.close()
        self._writer.close()



class LocalForward:
    """A unix socket here whose connections go, through an SSH connection, to a unix socket on the
    host (``forward_local_unix``); ``close()`` stops listening (connections already made go on until
    either end closes them)."""

    def __init__(self, listener: asyncssh.SSHListener, path: str, remote_path: str, label: str) -> None:
        self._listener = listener
        self.path = path
        self.remote_path = remote_path
        self.label = label

    async def close(self) -> None:
        self._listener.close()
        try:
            async with asyncio.timeout(CLOSE_TIMEOUT):
                await self._listener.wait_closed()
        except (TimeoutError, asyncssh.Error, OSError):
            pass
        try:
            os.unlink(self.path)
        except OSError:
            pass


async def forward_local_unix(conn: SshConnection, local_path: str, remote_path: str) -> LocalForward:
    """Listen on the unix socket ``local_path`` here and carry every connection to ``remote_path`` on
    the connection's host (direct stream-local forwarding: sshd connects there; nothing else runs on
    the host). The caller closes the forward."""
    try:
        listener = await conn._conn.forward_local_path(local_path, remote_path)
    except OSError as e:
        raise ConnectFailed(f"cannot listen on {local_path} here to forward to {conn.label}: "
                            f"{describe_os_error(e)}") from None
    except asyncssh.Error as e:
        raise conn._gone(e) from None
    return LocalForward(listener, local_path, remote_path, conn.label)
