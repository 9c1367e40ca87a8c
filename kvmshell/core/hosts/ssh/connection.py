"""One SSH connection to a host: ``ssh_connect`` opens an ``SshConnection`` with host key verification
against known_hosts; on it run commands (``RemoteResult``, ``RemoteProcess``) and channels to monitors
open. Every asyncssh exception is translated into the kvmshell error tree here.

Host keys: the server's key must be in a known_hosts file. An unknown key is refused
(``HostKeyUnknown``: its SHA256 fingerprint and how to accept it), unless the host's
``accept_new_host_key`` is set, and then it is accepted and appended to the known_hosts file. A key
that differs from the one on file is always refused (``HostKeyChanged``). There is no switch that
turns verification off.
"""

from __future__ import annotations

import asyncio
import functools
import importlib
import logging
import os
import shlex
import socket
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kvmshell.core.values.address import Address, Kind, SshTarget
from kvmshell.errors import (
    AuthFailed, ConfigError, ConnectFailed, Disconnected, HostDisconnected, HostKeyChanged, HostKeyUnknown,
    HostUnreachable,
)

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    import asyncssh

    Channel = tuple[asyncssh.SSHReader[bytes], asyncssh.SSHWriter[bytes]]
    """A channel to a monitor: what is read from it, what writes to it."""
else:
    class _LazyAsyncssh:
        """asyncssh takes ~130 ms to import: only a session that reaches a host over SSH pays for it."""

        def __getattr__(self, name: str) -> Any:
            return getattr(importlib.import_module("asyncssh"), name)

    asyncssh = _LazyAsyncssh()

PasswordPrompt = Callable[[str], Awaitable[str | None]]
"""Asks the user for a password (the prompt text is given); None when there is none to give."""

DEFAULT_KNOWN_HOSTS = Path("~/.ssh/known_hosts")
GLOBAL_KNOWN_HOSTS = Path("/etc/ssh/ssh_known_hosts")
MAX_PASSWORD_TRIES = 3
KEEPALIVE_COUNT = 3
CLOSE_TIMEOUT = 5.0



@dataclass(frozen=True)
class SshParams:
    """Everything one SSH connection needs, resolved from the config by ``pool.HostPool``."""

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

    async def open_channel(self, address: Address) -> Channel:
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
