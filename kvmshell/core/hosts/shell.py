"""Work on a host, here or over SSH: shell commands and their output, pipelines whose stdin and stdout
are byte streams (file copies), checksums and sizes of files there, the free space of a directory.

``HostShell(pool, host)`` is one host as the migrations use it (``host`` None: this machine, through
``sh -c``); its failures raise the ``error`` class it is given, so that a migration's messages keep
the migration's title.
"""

from __future__ import annotations

import asyncio
import os
import shlex
import signal
from typing import TYPE_CHECKING, Protocol as TypingProtocol

from kvmshell.core.hosts.ssh.connection import RemoteResult
from kvmshell.core.values.address import SshTarget
from kvmshell.errors import CommandFailed, KvmError

if TYPE_CHECKING:
    from kvmshell.core.hosts.pool import HostPool

CHUNK = 4 << 20                  # bytes a pipeline's stdout is read in (at most): the copy loop's reads
CHECKSUM = "b2sum"               # of each copied file: BLAKE2b-512 (coreutils), ~40 % of sha256sum's CPU time
HASH_TIMEOUT = 600.0
HASH_RATE_FLOOR = 20e6           # bytes/s: a hash slower than this is taken as stuck


async def run_here(command: str, timeout: float) -> RemoteResult | None:
    """``sh -c command`` on this host with stdin closed; None when it does not end within ``timeout``
    seconds. Overrun or cancelled (Ctrl-C), it is killed with everything it started, and reaped."""
    proc = await asyncio.create_subprocess_exec("sh", "-c", command, stdin=asyncio.subprocess.DEVNULL,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
                                                start_new_session=True)
    try:
        async with asyncio.timeout(timeout):
            out, err = await proc.communicate()
    except TimeoutError:
        await _kill_group(proc)
        return None
    except BaseException:
        await _kill_group(proc)
        raise
    return RemoteResult(command, proc.returncode or 0, out, err)


async def _kill_group(proc: asyncio.subprocess.Process) -> None:
    """SIGKILL ``proc``'s process group (it leads its own session), then reap it and close its pipes,
    even when the task waiting on it is being cancelled."""
    if proc.returncode is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    reaped = asyncio.ensure_future(proc.communicate())
    try:
        await asyncio.shield(reaped)
    except asyncio.CancelledError:          # cancelled again: the reaping still finishes, SIGKILL is quick
        await asyncio.wait([reaped], timeout=5)
        raise


class Process(TypingProtocol):
    """A pipeline started by ``HostShell.start`` (here: a subprocess; on a host: ssh.connection.RemoteProcess)."""

    async def read(self, size: int) -> bytes: ...

    async def write(self, data: bytes) -> None: ...

    async def finish(self, timeout: float) -> RemoteResult: ...

    def close(self) -> None: ...


class _LocalProcess:
    """A pipeline started here: its own process group, so that it is killed whole."""

    def __init__(self, command: str, proc: asyncio.subprocess.Process, error: type[KvmError]) -> None:
        self.command = command
        self._proc = proc
        self._error = error

    async def read(self, size: int) -> bytes:
        assert self._proc.stdout is not None
        return await self._proc.stdout.read(size)

    async def write(self, data: bytes) -> None:
        assert self._proc.stdin is not None
        try:
            self._proc.stdin.write(data)
            await self._proc.stdin.drain()
        except (BrokenPipeError, ConnectionResetError) as e:
            raise self._error(f"`{self.command.split()[0]}` here stopped reading: {e}") from None

    async def finish(self, timeout: float) -> RemoteResult:
        proc = self._proc
        assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
        try:
            async with asyncio.timeout(timeout):
                proc.stdin.close()
                out, err, _ = await asyncio.gather(proc.stdout.read(), proc.stderr.read(), proc.wait())
        except TimeoutError:
            self.close()
            raise self._error(f"`{self.command.split()[0]}` did not finish within {timeout:g} s here") from None
        return RemoteResult(self.command, proc.returncode or 0, out, err)

    def close(self) -> None:
        """Kill the pipeline (its own process group: sh and every command in it); ``reap`` waits for it."""
        if self._proc.returncode is None:
            try:
                os.killpg(self._proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    async def reap(self) -> None:
        await _kill_group(self._proc)


class HostShell:
    """A host as the migrations use it: shell commands, and pipelines that stream files (here or over
    SSH). ``error``: the KvmError class its failures raise."""

    def __init__(self, pool: HostPool | None, host: SshTarget | str | None, *,
                 error: type[KvmError] = CommandFailed) -> None:
        self.pool = pool
        self.host = host
        self.error = error
        self.label = "this host" if host is None else (pool.label(host) if pool else str(host))
        self._local: list[_LocalProcess] = []

    @property
    def local(self) -> bool:
        return self.host is None

    async def sh(self, command: str, timeout: float = 30.0) -> RemoteResult:
        if self.host is None:
            result = await run_here(command, timeout)
            if result is None:
                raise self.error(f"`{command.split()[0]}` did not finish within {timeout:g} s here")
            return result
        assert self.pool is not None
        return await self.pool.run(self.host, command, timeout)

    async def check(self, command: str, what: str, timeout: float = 30.0) -> str:
        """Run ``command``; its stdout, or ``error`` naming ``what`` and the host with its stderr."""
        r = await self.sh(command, timeout)
        if not r.ok:
            err = (r.stderr.decode(errors="replace") or r.text).strip().splitlines()
            raise self.error(f"{what} on {self.label} failed: {err[-1] if err else f'exit status {r.exit_status}'}")
        return r.text

    async def start(self, command: str) -> Process:
        """Start ``command`` with its stdin and stdout as byte streams; the caller finishes or closes it."""
        if self.host is None:
            proc = await asyncio.create_subprocess_exec("sh", "-c", command, stdin=asyncio.subprocess.PIPE,
                                                        stdout=asyncio.subprocess.PIPE,
                                                        stderr=asyncio.subprocess.PIPE, limit=CHUNK,
                                                        start_new_session=True)
            self._local.append(_LocalProcess(command, proc, self.error))
            return self._local[-1]
        assert self.pool is not None
        return await (await self.pool.connection(self.host)).start(command)

    async def checksum(self, path: str, prefix: int | None = None, size: int = 0, tool: str = CHECKSUM) -> str:
        """``tool``'s hash of the file (of its first ``prefix`` bytes); ``size`` sets the time allowed."""
        p = shlex.quote(path)
        cmd = f"{tool} -- {p}" if prefix is None else f"head -c {prefix} -- {p} | {tool}"
        timeout = max(HASH_TIMEOUT, (prefix or size) / HASH_RATE_FLOOR)
        out = await self.check(cmd, f"{tool} of {path}", timeout=timeout)
        return out.split()[0] if out.split() else ""

    async def sha256(self, path: str, prefix: int | None = None, size: int = 0) -> str:
        return await self.checksum(path, prefix, size, "sha256sum")

    async def kill_pidfile(self, pidfile: str) -> bool:
        """TERM the process whose pid ``pidfile`` holds, KILL it if it is still there 2 s later (a stopped
        or stuck QEMU), remove the pidfile; True if there was a process to signal."""
        p = shlex.quote(pidfile)
        r = await self.sh(f"if [ -f {p} ] && pid=$(cat {p}) && kill $pid 2>/dev/null; then echo killed; "
                          f"for i in $(seq 20); do kill -0 $pid 2>/dev/null || break; sleep 0.1; done; "
                          f"kill -KILL $pid 2>/dev/null; fi; rm -f {p}; true")
        return "killed" in r.text

    async def sizes(self, paths: list[str], free_in: str | None = None) -> dict[str, int]:
        """Sizes of the regular files among ``paths`` (missing ones are left out); with ``free_in``, the
        bytes free in that directory too, under the key ``free_in`` + "/" (one command either way)."""
        if not paths and free_in is None:
            return {}
        quoted = " ".join(shlex.quote(p) for p in paths)
        script = (f"for f in {quoted}; do [ -f \"$f\" ] && printf '%s\\t%s\\n' \"$(stat -c %s -- \"$f\")\" \"$f\"; "
                  "done; true")
        if free_in is not None:
            d = shlex.quote(free_in)
            script += f"; printf '%s\\t%s/\\n' \"$(df -B1 --output=avail -- {d} | tail -n 1)\" {d}"
        r = await self.sh(script)
        out = {}
        for line in r.text.splitlines():
            n, _, path = line.partition("\t")
            if n.strip().isdigit():
                out[path] = int(n)
        if free_in is not None and free_in + "/" not in out:
            raise self.error(f"df {free_in} on {self.label}: unreadable answer {r.text.strip()!r}")
        return out

    async def aclose(self) -> None:
        for p in self._local:                 # the pipelines started here: killed if still running, reaped
            await p.reap()
        self._local.clear()
