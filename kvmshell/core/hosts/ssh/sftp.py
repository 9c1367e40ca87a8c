"""SFTP on a host's SSH connection: files read and written at explicit offsets, many requests in
flight (``open_sftp``). The TLS certificates go to the hosts this way.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from kvmshell.core.hosts.ssh.connection import CLOSE_TIMEOUT, SshConnection
from kvmshell.errors import Disconnected

if TYPE_CHECKING:
    import asyncssh
else:
    from kvmshell.core.hosts.ssh.connection import asyncssh

log = logging.getLogger(__name__)

SFTP_REQUESTS = 128              # requests in flight per read or write (their size: what the server's
                                 # limits@openssh.com says, else asyncssh's default)


class SftpFailed(Disconnected):
    """A file operation over SFTP failed (no such file, no space left, permission...)."""

    title = "copy failed"


class SftpFile:
    """An open file on a host, read and written at explicit offsets (many requests in flight)."""

    def __init__(self, sftp: Sftp, path: str, handle: asyncssh.SFTPClientFile) -> None:
        self._sftp = sftp
        self.path = path
        self._f = handle

    async def read(self, size: int, offset: int) -> bytes:
        try:
            return bytes(await self._f.read(size, offset))
        except BaseException as e:
            raise self._sftp._error(e, f"reading {self.path}") from None

    async def write(self, data: bytes, offset: int) -> None:
        try:
            await self._f.write(data, offset)
        except BaseException as e:
            raise self._sftp._error(e, f"writing {self.path}") from None

    async def close(self) -> None:
        try:
            await self._f.close()
        except (asyncssh.Error, OSError) as e:
            log.debug("%s: closing %s: %r", self._sftp.label, self.path, e)


class Sftp:
    """An SFTP session on an ``SshConnection`` (``open_sftp``); every asyncssh error becomes SftpFailed
    (or HostDisconnected when the connection went)."""

    def __init__(self, conn: SshConnection, client: asyncssh.SFTPClient) -> None:
        self._conn = conn
        self._client = client
        self.label = conn.label

    def _error(self, e: BaseException, what: str) -> Disconnected:
        if isinstance(e, asyncssh.SFTPError):
            reason = e.reason.strip() or type(e).__name__
            if e.code in (asyncssh.FX_NO_SPACE_ON_FILESYSTEM, asyncssh.FX_QUOTA_EXCEEDED):
                reason = f"no space left ({reason})"
            return SftpFailed(f"{self.label}: {what}: {reason}")
        if isinstance(e, (asyncssh.Error, OSError)):
            return self._conn._gone(e)
        if isinstance(e, Exception):
            return SftpFailed(f"{self.label}: {what}: {e}")
        raise e                                  # CancelledError and friends go through

    async def size(self, path: str) -> int | None:
        """The file's size, None if there is no such file."""
        try:
            return int((await self._client.stat(path)).size or 0)
        except asyncssh.SFTPNoSuchFile:
            return None
        except BaseException as e:
            raise self._error(e, f"stat {path}") from None

    async def open(self, path: str, mode: str) -> SftpFile:
        """``mode``: "rb" (read), "r+b" (write into an existing file), "wb" (create or truncate)."""
        try:
            handle = await self._client.open(path, mode, encoding=None, max_requests=SFTP_REQUESTS)
        except BaseException as e:
            raise self._error(e, f"opening {path}") from None
        return SftpFile(self, path, handle)

    async def rename(self, old: str, new: str) -> None:
        """Rename, replacing ``new`` if it exists (POSIX rename)."""
        try:
            await self._client.posix_rename(old, new)
        except BaseException as e:
            raise self._error(e, f"renaming {old} to {new}") from None

    async def close(self) -> None:
        self._client.exit()
        try:
            async with asyncio.timeout(CLOSE_TIMEOUT):
                await self._client.wait_closed()
        except (TimeoutError, asyncssh.Error, OSError):
            pass



async def open_sftp(conn: SshConnection, timeout: float = 15.0) -> Sftp:
    """An SFTP session on the host's connection (the caller closes it). Needs the host's sshd to
    offer the sftp subsystem (OpenSSH's default)."""
    try:
        async with asyncio.timeout(timeout):
            client = await conn._conn.start_sftp_client()
    except TimeoutError:
        raise SftpFailed(f"{conn.label}: no SFTP session within {timeout:g} s") from None
    except asyncssh.ChannelOpenError as e:
        raise SftpFailed(f"{conn.label}: cannot open an SFTP session: {e.reason.strip()}") from None
    except asyncssh.SFTPError as e:
        raise SftpFailed(f"{conn.label}: SFTP refused: {e.reason.strip()} (is the sftp subsystem enabled in "
                         "its sshd_config?)") from None
    except (asyncssh.Error, OSError) as e:
        raise conn._gone(e) from None
    return Sftp(conn, client)
