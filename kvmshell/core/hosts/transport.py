"""Byte streams to a monitor: unix socket, TCP, pty - here or on another host through SSH.

``open_stream`` gives a ``Stream`` whatever the transport (HMP speaks through it); ``open_socket``
gives a connected socket for a monitor on another host (qemu.qmp takes a socket: a local socketpair
bridged to the SSH channel). This is the one module that imports asyncssh: ``ssh_connect`` opens an
``SshConnection`` with host key verification against known_hosts, and every asyncssh exception is
translated into the kvmshell error tree here. Which connection serves which host (sharing,
reconnecting, the config) is ``remote.HostPool``'s business, not this module's.

Host keys: the server's key must be in a known_hosts file. An unknown key is refused
(``HostKeyUnknown``: its SHA256 fingerprint and how to accept it), unless the host's
``accept_new_host_key`` is set, and then it is accepted and appended to the known_hosts file. A key
that differs from the one on file is always refused (``HostKeyChanged``). There is no switch that
turns verification off.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import shlex
import socket
import termios
import tty
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
import functools
import importlib
from typing import TYPE_CHECKING, Any, Protocol as TypingProtocol

from kvmshell.core.values.address import Address, Kind, SshTarget
from kvmshell.errors import (
    AuthFailed, ConfigError, ConnectFailed, Disconnected, HostDisconnected, HostKeyChanged, HostKeyUnknown,
    HostUnreachable,
)

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    import asyncssh
else:
    class _LazyAsyncssh:
        """asyncssh takes ~130 ms to import: only a session that reaches a host over SSH pays for it."""

        def __getattr__(self, name: str) -> Any:
            return getattr(importlib.import_module("asyncssh"), name)

    asyncssh = _LazyAsyncssh()

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


async def open_stream(address: Address, timeout: float, hosts: Connector | None = None) -> Stream:
    """Open a raw byte stream to a monitor. Raises ConnectFailed with the reason.

    A monitor on another host (``address.ssh``) is reached through ``hosts``' SSH connection to it.
    """
    if address.ssh is not None:
        conn, reader, writer = await _open_remote(address, timeout, hosts)
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
        raise ConnectFailed(f"{address}: {_describe_os_error(e)}") from None


async def open_socket(address: Address, timeout: float, hosts: Connector | None) -> SocketBridge:
    """A connected local socket whose bytes go to and from the monitor at ``address`` on another host.

    The caller owns the bridge: ``aclose()`` it after it is done with ``bridge.sock``.
    """
    conn, reader, writer = await _open_remote(address, timeout, hosts)
    bridge = SocketBridge(conn, reader, writer, str(address))
    try:
        await bridge.start()
    except BaseException:
        await bridge.aclose()
        raise
    return bridge


async def _open_remote(address: Address, timeout: float, hosts: Connector | None) -> tuple[
        SshConnection, asyncssh.SSHReader[bytes], asyncssh.SSHWriter[bytes]]:
    assert address.ssh is not None
    if address.kind is Kind.PTY:
        raise ConnectFailed(f"{address}: a pty on another host cannot be reached through SSH; give the guest a "
                            "unix socket monitor (-qmp unix:PATH,server=on,wait=off)")
    if hosts is None:
        raise ConfigError(f"{address}: no SSH host pool to reach {address.ssh} with")
    conn = await hosts.connection(address.ssh)
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await conn.open_channel(address)
    except TimeoutError:
        raise ConnectFailed(f"{address}: no channel to the monitor through {conn.label} within {timeout:g} s") from None
    return conn, reader, writer


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


# == SSH ========================================================================================

PasswordPrompt = Callable[[str], Awaitable[str | None]]
"""Asks the user for a password (the prompt text is given); None when there is none to give."""

DEFAULT_KNOWN_HOSTS = Path("~/.ssh/known_hosts")
GLOBAL_KNOWN_HOSTS = Path("/etc/ssh/ssh_known_hosts")
MAX_PASSWORD_TRIES = 3
KEEPALIVE_COUNT = 3
CLOSE_TIMEOUT = 5.0


class Connector(TypingProtocol):
    """What gives a monitor the SSH connection to its host (``remote.HostPool``)."""

    async def connection(self, target: SshTarget) -> SshConnection: ...


@dataclass(frozen=True)
class SshParams:
    """Everything one SSH connection needs, resolved from the config by ``remote.HostPool``."""

    target: SshTarget
    label: str                                   # how messages name the host: host a (root@10.0.0.2:22)
    host_name: str | None = None                 # its [hosts.NAME], for the hints in messages
    identity_file: Path | None = None
    accept_new_host_key: bool = False
    known_hosts: Path = DEFAULT_KNOWN_HOSTS      # checked, and where accepted keys are recorded
    extra_known_hosts: tuple[Path, ...] = ()     # also checked, never written (the global file)
    ssh_config: Path | None = None               # None: asyncssh's default, ~/.ssh/config
    connect_timeout: float = 10.0
    keepalive: float | None = 15.0               # seconds between keepalives; KEEPALIVE_COUNT unanswered = lost


@dataclass(frozen=True)
class RemoteResult:
    """What a command run on a host gave back."""

    command: str
    exit_status: int
    stdout: bytes
    stderr: bytes

    @property
    def ok(self) -> bool:
        return self.exit_status == 0

    @property
    def text(self) -> str:
        return self.stdout.decode("utf-8", errors="replace")


def _key_pattern(host: str, port: int | None) -> str:
    """How known_hosts names a host: ``host``, or ``[host]:port`` off port 22."""
    return host if port in (None, 22) else f"[{host}]:{port}"


def _read_known_hosts(files: Sequence[Path]) -> asyncssh.SSHKnownHosts:
    texts = []
    for path in files:
        try:
            texts.append(path.read_text(encoding="utf-8", errors="replace"))
        except FileNotFoundError:
            continue
        except OSError as e:
            raise ConfigError(f"known_hosts file {path}: {e.strerror}") from None
    try:
        return asyncssh.import_known_hosts("\n".join(texts))
    except (ValueError, asyncssh.KeyImportError) as e:
        raise ConfigError(f"known_hosts {', '.join(map(str, files))}: {e}") from None


def _record_key(path: Path, pattern: str, key: asyncssh.SSHKey) -> None:
    """Append ``pattern alg key`` to a known_hosts file (made 0600, in a 0700 directory, if missing)."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    alg, b64 = key.export_public_key("openssh").decode().split()[:2]
    newline = ""
    try:
        with open(path, "rb") as f:
            if f.seek(0, os.SEEK_END):
                f.seek(-1, os.SEEK_END)
                newline = "" if f.read(1) == b"\n" else "\n"
    except FileNotFoundError:
        pass
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    with os.fdopen(fd, "a", encoding="utf-8") as f:
        f.write(f"{newline}{pattern} {alg} {b64}\n")


def _describe_lost(exc: BaseException | None) -> str:
    if exc is None:
        return "closed"
    if isinstance(exc, asyncssh.DisconnectError):
        reason = exc.reason.strip() or type(exc).__name__
        if reason.lower() == "connection lost":
            return "the connection closed (sshd on the host went away, or the network reset it)"
        if "keepalive" in reason.lower():
            return f"no answer to keepalives ({reason})"
        return reason
    if isinstance(exc, OSError):
        return exc.strerror or str(exc)
    return str(exc) or type(exc).__name__


class _ClientCallbacks:
    """asyncssh's callbacks for one connection (an ``asyncssh.SSHClient``, see ``_client_class``):
    host key policy, password prompts, loss."""

    def __init__(self, params: SshParams, known: asyncssh.SSHKnownHosts, user: str,
                 prompt: PasswordPrompt | None) -> None:
        self.params = params
        self.known = known
        self.user = user
        self.prompt = prompt
        self.offered: asyncssh.SSHKey | None = None     # the server's host key, when it was not trusted
        self.key_host: tuple[str, int | None] = (params.target.host, params.target.port)
        self.had_keys = False                           # known_hosts had (other) keys for the host
        self.accepted = False                           # accepted on first use: to be recorded
        self.password_wanted = False                    # the server would take a password we could not ask
        self.password_tries = 0
        self.timeout: asyncio.Timeout | None = None     # the connect timeout, paused while a human types
        self.lost = asyncio.Event()
        self.lost_reason: str | None = None

    def validate_host_public_key(self, host: str, addr: str, port: int, key: asyncssh.SSHKey) -> bool:
        # Called by asyncssh only for a key that no known_hosts entry trusts.
        self.offered = key
        self.key_host = (host, port)
        trusted, _ca, revoked = asyncssh.match_known_hosts(self.known, host, addr, port)[:3]
        self.had_keys = bool(trusted) or key in revoked
        if not self.had_keys and self.params.accept_new_host_key:
            self.accepted = True
            log.warning("%s: accepting new host key %s %s (accept_new_host_key)", self.params.label,
                        key.get_algorithm(), key.get_fingerprint("sha256"))
            return True
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost_reason = _describe_lost(exc)
        self.lost.set()

    async def _ask(self, text: str) -> str | None:
        assert self.prompt is not None
        loop = asyncio.get_running_loop()
        if self.timeout is not None:
            self.timeout.reschedule(None)           # a person is typing: the connect timeout waits
        try:
            return await self.prompt(text)
        finally:
            if self.timeout is not None:
                self.timeout.reschedule(loop.time() + self.params.connect_timeout)

    async def password_auth_requested(self) -> str | None:
        if self.prompt is None:
            self.password_wanted = True
            return None
        if self.password_tries >= MAX_PASSWORD_TRIES:
            return None
        self.password_tries += 1
        return await self._ask(f"{self.user}@{self.params.target.host}'s password: ")

    def kbdint_auth_requested(self) -> str | None:
        if self.prompt is None:
            self.password_wanted = True
            return None
        return "" if self.password_tries < MAX_PASSWORD_TRIES else None

    async def kbdint_challenge_received(self, name: str, instructions: str, lang: str,
                                        prompts: Sequence[tuple[str, bool]]) -> list[str] | None:
        answers = []
        for text, _echo in prompts:
            self.password_tries += 1
            answer = await self._ask(text or f"{self.user}@{self.params.target.host}'s password: ")
            if answer is None:
                return None
            answers.append(answer)
        return answers


@functools.cache
def _client_class() -> type[_ClientCallbacks]:
    return type("_Client", (_ClientCallbacks, asyncssh.SSHClient), {})


class SshConnection:
    """One SSH connection to a host: channels to monitors, commands. Made by ``ssh_connect``."""

    def __init__(self, params: SshParams, conn: asyncssh.SSHClientConnection, client: _ClientCallbacks) -> None:
        self.params = params
        self._conn = conn
        self._client = client

    @property
    def label(self) -> str:
        return self.params.label

    @property
    def alive(self) -> bool:
        return not self._client.lost.is_set()

    @property
    def lost_reason(self) -> str | None:
        """Why the connection is gone (None while it is up)."""
        return self._client.lost_reason if not self.alive else None

    def lost_message(self) -> str:
        return f"SSH connection to {self.label} lost: {self._client.lost_reason or 'closed'}"

    async def wait_lost(self) -> None:
        await self._client.lost.wait()

    def _gone(self, e: BaseException) -> Disconnected:
        if not self.alive:
            return HostDisconnected(self.lost_message())
        return HostDisconnected(f"SSH connection to {self.label}: {_describe_lost(e)}")

    async def open_channel(self, address: Address) -> tuple[asyncssh.SSHReader[bytes], asyncssh.SSHWriter[bytes]]:
        """A channel to the monitor at ``address`` on this host: direct stream-local (unix) or TCP forwarding."""
        try:
            if address.kind is Kind.UNIX:
                assert address.path is not None
                return await self._conn.open_unix_connection(address.path)
            assert address.host is not None and address.port is not None
            return await self._conn.open_connection(address.host, address.port)
        except asyncssh.ChannelOpenError as e:
            raise ConnectFailed(f"{address}: {await self._explain(address, e)}") from None
        except (asyncssh.Error, OSError) as e:
            raise self._gone(e) from None

    async def _explain(self, address: Address, e: asyncssh.ChannelOpenError) -> str:
        """Why sshd could not connect to the monitor, in the words used for a local one."""
        if e.code == asyncssh.OPEN_ADMINISTRATIVELY_PROHIBITED:
            return (f"{self.label} does not allow forwarding ({e.reason.strip()}): set AllowStreamLocalForwarding "
                    "and AllowTcpForwarding to yes in its sshd_config")
        if address.kind is Kind.TCP:
            reason = e.reason.strip()
            if "refused" in reason.lower():
                return f"connection refused on {self.label} (nothing listening there)"
            return f"{self.label} cannot connect to it: {reason}"
        assert address.path is not None
        p = shlex.quote(address.path)
        script = (f"if [ -S {p} ]; then echo socket; elif [ -d {p} ]; then echo directory; "
                  f"elif [ -f {p} ]; then echo file; elif [ -e {p} ]; then echo other; else echo missing; fi")
        try:
            what = (await self.run(script, timeout=5.0)).text.strip()
        except ConnectFailed:
            what = ""
        except Exception as probe_error:   # the explanation is best effort; the failure stands
            log.debug("%s: probing %s failed: %r", self.label, address.path, probe_error)
            what = ""
        if what == "missing":
            return f"no such socket on {self.label} (is the guest running, and the path right?)"
        if what == "directory":
            return f"{address.path} is a directory on {self.label}, not a monitor socket"
        if what == "file":
            return f"{address.path} is a regular file on {self.label}, not a monitor socket"
        if what == "other":
            return f"{address.path} on {self.label} is not a socket"
        if what == "socket":
            return f"connection refused on {self.label} (nothing listening there, or no permission: {e.reason.strip()})"
        return f"{self.label} cannot connect to it: {e.reason.strip()}"

    async def run(self, command: str, timeout: float) -> RemoteResult:
        """Run ``command`` through the user's shell on the host; its exit status and output."""
        try:
            async with asyncio.timeout(timeout):
                async with self._conn.create_process(command, encoding=None, stdin=asyncssh.DEVNULL) as proc:
                    out, err = await proc.communicate()
                    status = proc.exit_status
        except TimeoutError:
            raise ConnectFailed(f"{self.label}: `{command.split()[0]}` did not finish within {timeout:g} s") from None
        except asyncssh.ChannelOpenError as e:
            raise ConnectFailed(f"{self.label}: cannot run a command there: {e.reason.strip()}") from None
        except (asyncssh.Error, OSError) as e:
            raise self._gone(e) from None
        return RemoteResult(command, status if status is not None else -1, bytes(out or b""), bytes(err or b""))

    async def start(self, command: str) -> RemoteProcess:
        """Start ``command`` on the host with its stdin and stdout as byte streams (file copies)."""
        try:
            proc = await self._conn.create_process(command, encoding=None, window=STREAM_WINDOW)
        except asyncssh.ChannelOpenError as e:
            raise ConnectFailed(f"{self.label}: cannot run a command there: {e.reason.strip()}") from None
        except (asyncssh.Error, OSError) as e:
            raise self._gone(e) from None
        return RemoteProcess(self, command, proc)

    async def close(self) -> None:
        self._conn.close()
        try:
            async with asyncio.timeout(CLOSE_TIMEOUT):
                await self._conn.wait_closed()
        except TimeoutError:
            log.warning("%s: SSH connection did not close within %g s; aborting it", self.label, CLOSE_TIMEOUT)
            self._conn.abort()

    def __repr__(self) -> str:
        return f"<SshConnection {self.label} {'up' if self.alive else 'lost'}>"


# asyncssh's default order with AES-GCM moved before chacha20-poly1305: the hosts that run QEMU have
# AES in hardware, and kvmshell relays file copies (static migration) in Python, where AES-GCM costs
# about 2/3 of the CPU time chacha20-poly1305 does (bench/RESULTS-static.md). A Ciphers line in
# ssh_config still decides.
PREFERRED_CIPHERS = "^aes128-gcm@openssh.com,aes256-gcm@openssh.com"
STREAM_WINDOW = 8 << 20          # bytes the host may send ahead on a RemoteProcess's stdout


class RemoteProcess:
    """A command running on a host (``SshConnection.start``): write its stdin, read its stdout, then
    ``finish`` for the rest of its output and its exit status."""

    def __init__(self, conn: SshConnection, command: str, proc: asyncssh.SSHClientProcess[bytes]) -> None:
        self._conn = conn
        self.command = command
        self._proc = proc
        self._eof_sent = False

    async def read(self, size: int) -> bytes:
        """Up to ``size`` bytes of its stdout, as soon as some are there; b"" at the end."""
        try:
            return await self._proc.stdout.read(size)
        except (asyncssh.Error, OSError) as e:
            raise self._conn._gone(e) from None

    async def write(self, data: bytes) -> None:
        try:
            self._proc.stdin.write(data)
            await self._proc.stdin.drain()
        except (asyncssh.Error, OSError) as e:          # BrokenPipeError: the command exited
            raise self._conn._gone(e) from None

    async def finish(self, timeout: float) -> RemoteResult:
        """Close its stdin and wait for it to exit: the rest of its stdout, its stderr, its status."""
        try:
            async with asyncio.timeout(timeout):
                if not self._eof_sent:
                    self._eof_sent = True
                    self._proc.stdin.write_eof()
                out, err = await self._proc.communicate()
        except TimeoutError:
            self.close()
            raise ConnectFailed(f"{self._conn.label}: `{self.command.split()[0]}` did not finish within "
                                f"{timeout:g} s") from None
        except (asyncssh.Error, OSError) as e:
            raise self._conn._gone(e) from None
        status = self._proc.exit_status
        return RemoteResult(self.command, status if status is not None else -1, bytes(out or b""), bytes(err or b""))

    def close(self) -> None:
        """Drop the channel (the command's stdin ends; its stdout and stderr go nowhere)."""
        self._proc.close()


def _sources(params: SshParams) -> str:
    if params.identity_file is not None:
        return f"identity_file {params.identity_file} and the agent's keys"
    return "the agent's keys and ~/.ssh/id_*"


def _unknown_key_message(params: SshParams, client: _ClientCallbacks) -> str:
    key = client.offered
    assert key is not None
    host, port = client.key_host
    pattern = _key_pattern(host, port)
    files = ", ".join(str(p) for p in (params.known_hosts, *params.extra_known_hosts))
    how = (f"set accept_new_host_key = true in [hosts.{params.host_name}]" if params.host_name else
           "add a [hosts.NAME] table for it with accept_new_host_key = true")
    keyscan = f"ssh-keyscan{f' -p {port}' if port not in (None, 22) else ''} -t {key.get_algorithm()} {host}"
    return (f"{params.label}: host key not known: no key for {pattern} in {files}; the server's "
            f"{key.get_algorithm()} key is {key.get_fingerprint('sha256')}; if that fingerprint is right, {how} (it "
            f"is then accepted once and recorded), or add it with `{keyscan} >> {params.known_hosts}`")


def _changed_key_message(params: SshParams, client: _ClientCallbacks) -> str:
    key = client.offered
    assert key is not None
    host, port = client.key_host
    pattern = _key_pattern(host, port)
    return (f"{params.label}: HOST KEY CHANGED: the server's {key.get_algorithm()} key is now "
            f"{key.get_fingerprint('sha256')}, not the one {params.known_hosts} has for {pattern} - someone may be "
            f"intercepting the connection, or the host was reinstalled; if you know why it changed, remove the old "
            f"key with `ssh-keygen -R '{pattern}' -f {params.known_hosts}` and accept the new one")


async def ssh_connect(params: SshParams, *, tunnel: SshConnection | None = None,
                      password_prompt: PasswordPrompt | None = None) -> SshConnection:
    """Open and authenticate one SSH connection, the host key checked against known_hosts.

    Reads ``params.ssh_config`` (else ~/.ssh/config), the agent and the usual key files, as ssh does;
    ``identity_file`` replaces the key files. Raises HostUnreachable, HostKeyUnknown, HostKeyChanged,
    AuthFailed or ConnectFailed, each a one-line message naming the host.
    """
    label, target = params.label, params.target
    known_files = [params.known_hosts.expanduser(), *(p.expanduser() for p in params.extra_known_hosts)]
    known = await asyncio.to_thread(_read_known_hosts, known_files)
    kw: dict[str, Any] = {
        "host": target.host,
        "known_hosts": known,
        "connect_timeout": None,                 # bounded below, with the prompt's time left out
        "config": [str(params.ssh_config.expanduser())] if params.ssh_config else (),
    }
    if target.port:
        kw["port"] = target.port
    if target.user:
        kw["username"] = target.user
    if params.keepalive:
        kw["keepalive_interval"] = params.keepalive
        kw["keepalive_count_max"] = KEEPALIVE_COUNT
    if params.identity_file is not None:
        ident = params.identity_file.expanduser()
        if not ident.exists():
            raise ConfigError(f"{label}: identity_file {ident} does not exist")
        kw["client_keys"] = [str(ident)]
    if tunnel is not None:
        kw["tunnel"] = tunnel._conn
    try:
        options = await asyncssh.SSHClientConnectionOptions.construct(**kw)
    except (asyncssh.KeyImportError, asyncssh.KeyEncryptionError) as e:
        raise ConfigError(f"{label}: cannot load the key {params.identity_file or ''}: {e} (load an encrypted key "
                          "into ssh-agent with ssh-add)") from None
    except OSError as e:
        raise ConfigError(f"{label}: {e.filename or 'ssh settings'}: {e.strerror}") from None
    except (asyncssh.Error, ValueError) as e:
        raise ConfigError(f"{label}: bad SSH settings: {e}") from None
    if not options.config.get("Ciphers"):     # no Ciphers in ssh_config: AES-GCM first (see PREFERRED_CIPHERS)
        options = await asyncssh.SSHClientConnectionOptions.construct(options=options,
                                                                      encryption_algs=PREFERRED_CIPHERS)
    user = str(options.username or target.user or "")
    port = int(options.port or target.port or 22)
    client = _client_class()(params, known, user, password_prompt)
    conn: asyncssh.SSHClientConnection | None = None
    try:
        async with asyncio.timeout(params.connect_timeout) as client.timeout:
            conn = await asyncssh.connect(target.host, options=options, client_factory=lambda: client,
                                          **{k: v for k, v in kw.items() if k in ("port", "config", "tunnel")})
    except TimeoutError:
        raise HostUnreachable(f"{label}: no SSH connection within {params.connect_timeout:g} s (host down, or "
                              "its packets dropped)") from None
    except asyncssh.HostKeyNotVerifiable as e:
        if client.offered is None:
            raise HostKeyChanged(f"{label}: host key not verifiable: {e.reason}") from None
        if client.had_keys:
            raise HostKeyChanged(_changed_key_message(params, client)) from None
        raise HostKeyUnknown(_unknown_key_message(params, client)) from None
    except asyncssh.KeyExchangeFailed as e:
        if "host key" in e.reason.lower():
            raise HostKeyChanged(f"{label}: the server offers no host key of a kind {params.known_hosts} has for "
                                 f"it ({e.reason}): its key may have changed") from None
        raise HostUnreachable(f"{label}: SSH key exchange failed: {e.reason}") from None
    except asyncssh.PermissionDenied:
        what = f"the server refused the keys offered for user {user!r} ({_sources(params)})"
        if client.password_tries:
            what = f"the server refused the keys and the password given for user {user!r}"
        elif client.password_wanted:
            what += "; it would take a password, but there is no terminal to ask for one"
        raise AuthFailed(f"{label}: authentication failed for {user}@{target.host}: {what}; check the user name "
                         "and that the public key is in that user's ~/.ssh/authorized_keys there") from None
    except asyncssh.ChannelOpenError as e:
        via = tunnel.label if tunnel is not None else "the jump host"
        raise HostUnreachable(f"{label}: {via} cannot reach it: {e.reason.strip()}") from None
    except asyncssh.DisconnectError as e:
        raise HostUnreachable(f"{label}: the server closed the connection during the SSH handshake "
                              f"({e.reason.strip() or type(e).__name__})") from None
    except ConnectionRefusedError:
        raise HostUnreachable(f"{label}: connection refused (no SSH server listening on port {port})") from None
    except socket.gaierror as e:
        raise HostUnreachable(f"{label}: cannot resolve {target.host!r} ({e.strerror})") from None
    except OSError as e:
        raise HostUnreachable(f"{label}: {e.strerror or e}") from None
    except asyncssh.Error as e:
        raise ConnectFailed(f"{label}: SSH failed: {e}") from None
    finally:
        client.timeout = None
        if client.accepted and client.offered is not None:
            host, kport = client.key_host
            try:
                await asyncio.to_thread(_record_key, params.known_hosts.expanduser(), _key_pattern(host, kport),
                                        client.offered)
                log.warning("%s: recorded host key %s in %s", label, client.offered.get_fingerprint("sha256"),
                            params.known_hosts)
            except OSError as e:
                log.error("%s: could not record the host key in %s: %s", label, params.known_hosts, e)
    log.info("%s: SSH connection up (user %s)", label, user)
    return SshConnection(params, conn, client)


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
                            f"{_describe_os_error(e)}") from None
    except asyncssh.Error as e:
        raise conn._gone(e) from None
    return LocalForward(listener, local_path, remote_path, conn.label)


# == SFTP (file copies between hosts: static migration) ===========================================

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
