"""Hosts over SSH: one shared connection per host.

``HostPool`` maps an ``SshTarget`` (what an ``ssh://`` address or a ``[guests.X] host`` gives) to
its ``[hosts.NAME]`` settings - identity file, jump host, accept_new_host_key - and keeps one SSH
connection per host, shared by every monitor on it. A connection that dropped is opened again the
next time a monitor asks for it (the fleet's reconnect loop does), with a per-host backoff so that
twenty guests on a dead host make one attempt, not twenty. Make one from the config and hand it
to the fleet, which passes it to every monitor and closes it::

    pool = HostPool.from_config(config, connect_timeout=5)
    fleet = Fleet(hosts=pool)          # fleet.aclose() closes every SSH connection

What runs on a host (QEMU processes, free ports) is ``processes``'; nothing here imports asyncssh:
``ssh`` does the SSH.
"""

from __future__ import annotations

import asyncio
import getpass
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kvmshell.config import Config, HostConfig, parse_ssh_target
from kvmshell.core.values.address import SshTarget, uri_host
from kvmshell.core.hosts.ssh.connection import (
    DEFAULT_KNOWN_HOSTS, GLOBAL_KNOWN_HOSTS, PasswordPrompt, RemoteResult, SshConnection, SshParams, ssh_connect,
)
from kvmshell.errors import ConfigError, Disconnected, KvmError

log = logging.getLogger(__name__)

COMMAND_TIMEOUT = 15.0


def ssh_text(t: SshTarget) -> str:
    """``user@host:port`` as written in a [hosts.NAME] ssh key (the parts that are known)."""
    host = uri_host(t.host)
    return f"{t.user + '@' if t.user else ''}{host}{':' + str(t.port) if t.port else ''}"


def host_label(hc: HostConfig) -> str:
    """How messages name a host: ``host a (root@10.0.0.2:22)``, or ``root@10.0.0.2:22`` off the config."""
    where = ssh_text(hc.ssh)
    return f"host {hc.name} ({where})" if hc.name and hc.name != where else where


def _same_port(a: int | None, b: int | None) -> bool:
    return (a or 22) == (b or 22)


@dataclass
class _Entry:
    """One host's connection and its reconnect state."""

    config: HostConfig
    params: SshParams
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    conn: SshConnection | None = None
    failures: int = 0
    next_try: float = 0.0
    last_error: KvmError | None = None
    connected_once: bool = False


class HostPool:
    """The SSH hosts kvmshell knows and one shared connection per host. See the module docstring.

    ``known_hosts`` is the file host keys are checked against and accepted keys are recorded in
    (default ``~/.ssh/known_hosts``, plus ``/etc/ssh/ssh_known_hosts`` read only); ``ssh_config``
    replaces ``~/.ssh/config``. ``password_prompt`` is asked when a server wants a password, for the
    first connection to each host only (a reconnection never prompts: it may happen under a running
    UI); without it, such a server is an AuthFailed that says so. Passwords are never kept.
    """

    def __init__(self, hosts: Mapping[str, HostConfig] | Iterable[HostConfig] = (), *,
                 known_hosts: str | Path | None = None, ssh_config: str | Path | None = None,
                 connect_timeout: float = 10.0, keepalive: float | None = 15.0,
                 backoff: tuple[float, float] = (0.25, 8.0),
                 password_prompt: PasswordPrompt | None = None) -> None:
        items = hosts.values() if isinstance(hosts, Mapping) else hosts
        self.hosts: dict[str, HostConfig] = {h.name: h for h in items}
        if known_hosts is None:
            self.known_hosts, self._extra_known = DEFAULT_KNOWN_HOSTS, (GLOBAL_KNOWN_HOSTS,)
        else:
            self.known_hosts, self._extra_known = Path(known_hosts), ()
        self.ssh_config = Path(ssh_config) if ssh_config is not None else None
        self.connect_timeout = connect_timeout
        self.keepalive = keepalive
        self.backoff = backoff
        self.password_prompt = password_prompt
        self._entries: dict[tuple[str, str, int], _Entry] = {}
        self._closed = False

    @classmethod
    def from_config(cls, config: Config, **kw: Any) -> HostPool:
        return cls(config.hosts, **kw)

    # -- which host is this ----------------------------------------------------------------
    def lookup(self, target: SshTarget | str) -> HostConfig:
        """The settings for ``target``: a [hosts.NAME] by name or by address, else a bare one."""
        if isinstance(target, str):
            if target in self.hosts:
                return self.hosts[target]
            target = parse_ssh_target(target, "host")
        for hc in self.hosts.values():
            t = hc.ssh
            if t.host == target.host and _same_port(t.port, target.port) and (
                    target.user is None or t.user is None or t.user == target.user):
                if target.user and not t.user:
                    return HostConfig(hc.name, SshTarget(t.host, target.user, t.port), hc.identity_file,
                                      hc.jump, hc.accept_new_host_key)
                return hc
        named = self.hosts.get(target.host)
        if named is not None and (target.user is None or named.ssh.user in (None, target.user)):
            t = named.ssh
            return HostConfig(named.name, SshTarget(t.host, target.user or t.user, target.port or t.port),
                              named.identity_file, named.jump, named.accept_new_host_key)
        return HostConfig(ssh_text(target), target)

    def label(self, target: SshTarget | str) -> str:
        return host_label(self.lookup(target))

    def libvirt_uri(self, name: str) -> str:
        """libvirt's connection to the host ``name``, its host key checked against this pool's
        known_hosts file as kvmshell's own SSH does (``HostConfig.libvirt_uri``)."""
        return self.lookup(name).libvirt_uri(str(self.known_hosts))

    def _params(self, hc: HostConfig) -> SshParams:
        return SshParams(
            target=hc.ssh, label=host_label(hc), host_name=hc.name if hc.name in self.hosts else None,
            identity_file=Path(hc.identity_file) if hc.identity_file else None,
            accept_new_host_key=hc.accept_new_host_key, known_hosts=self.known_hosts,
            extra_known_hosts=self._extra_known, ssh_config=self.ssh_config,
            connect_timeout=self.connect_timeout, keepalive=self.keepalive)

    @staticmethod
    def _key(hc: HostConfig) -> tuple[str, str, int]:
        return (hc.ssh.user or "", hc.ssh.host, hc.ssh.port or 22)

    def key(self, target: SshTarget | str) -> tuple[str, str, int]:
        """What makes two targets the same host here, i.e. the same shared connection."""
        return self._key(self.lookup(target))

    # -- connections -----------------------------------------------------------------------
    async def connection(self, target: SshTarget | str) -> SshConnection:
        """The host's SSH connection: the shared one if it is up, else a new one (or the last error
        again while the host is in backoff). Raises the errors of ``ssh.connection.ssh_connect``."""
        return await self._connection(self.lookup(target), ())

    async def _connection(self, hc: HostConfig, chain: tuple[tuple[str, str, int], ...]) -> SshConnection:
        if self._closed:
            raise Disconnected(f"{host_label(hc)}: the host pool is closed")
        key = self._key(hc)
        if key in chain:
            raise ConfigError(f"{host_label(hc)}: jump hosts go round in a loop")
        entry = self._entries.get(key)
        if entry is None:
            entry = self._entries[key] = _Entry(hc, self._params(hc))
        async with entry.lock:
            if entry.conn is not None:
                if entry.conn.alive:
                    return entry.conn
                old, entry.conn = entry.conn, None
                log.info("%s", old.lost_message())
                await old.close()
            loop = asyncio.get_running_loop()
            if entry.last_error is not None and loop.time() < entry.next_try:
                raise _again(entry.last_error)
            try:
                tunnel = await self._connection(self.lookup(hc.jump), (*chain, key)) if hc.jump else None
                conn = await ssh_connect(entry.params, tunnel=tunnel,
                                         password_prompt=None if entry.connected_once else self.password_prompt)
            except KvmError as e:
                entry.failures += 1
                entry.next_try = loop.time() + min(self.backoff[0] * 2 ** (entry.failures - 1), self.backoff[1])
                entry.last_error = e
                raise
            if self._closed:                       # closed while we connected: do not leak it
                await conn.close()
                raise Disconnected(f"{host_label(hc)}: the host pool is closed")
            entry.conn, entry.failures, entry.last_error, entry.connected_once = conn, 0, None, True
            return conn

    def connected(self, target: SshTarget | str) -> bool:
        entry = self._entries.get(self._key(self.lookup(target)))
        return entry is not None and entry.conn is not None and entry.conn.alive

    async def run(self, host: SshTarget | str, command: str, timeout: float = COMMAND_TIMEOUT) -> RemoteResult:
        """Run a shell command on the host, through its shared connection."""
        return await (await self.connection(host)).run(command, timeout)

    async def aclose(self) -> None:
        """Close every connection (idempotent). Monitors still using one see it drop."""
        self._closed = True
        conns = [e.conn for e in self._entries.values() if e.conn is not None]
        for e in self._entries.values():
            e.conn = None
        await asyncio.gather(*(c.close() for c in conns), return_exceptions=True)

    async def __aenter__(self) -> HostPool:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


def _again(e: KvmError) -> KvmError:
    """A fresh copy of an error to raise once more (an exception object is not raised twice)."""
    copy = type(e)(e.message, guest=e.guest)
    copy.title = e.title
    return copy


async def terminal_password_prompt(text: str) -> str | None:
    """Ask on the controlling terminal without echo (getpass, in a thread); None if there is none."""
    try:
        return await asyncio.to_thread(getpass.getpass, text)
    except (EOFError, OSError):
        return None
