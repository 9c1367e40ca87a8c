"""Hosts over SSH: one shared connection per host, and what kvmshell finds on a host.

``HostPool`` maps an ``SshTarget`` (what an ``ssh://`` address or a ``[guests.X] host`` gives) to
its ``[hosts.NAME]`` settings - identity file, jump host, accept_new_host_key - and keeps one SSH
connection per host, shared by every monitor on it. A connection that dropped is opened again the
next time a monitor asks for it (the fleet's reconnect loop does), with a per-host backoff so that
twenty guests on a dead host make one attempt, not twenty. Make one from the config and hand it
to the fleet, which passes it to every monitor and closes it::

    pool = HostPool.from_config(config, connect_timeout=5)
    fleet = Fleet(hosts=pool)          # fleet.aclose() closes every SSH connection

``discover(pool, host)`` lists the QEMU processes on a host and their monitor sockets, read from
``/proc/*/cmdline`` (and, for monitors QEMU got as a file descriptor, ``/proc/PID/fd`` and
``/proc/net/unix``); ``survey`` adds reachability and QEMU's version, for ``kvmshell hosts``.
Nothing here imports asyncssh: ``ssh`` does the SSH.
"""

from __future__ import annotations

import asyncio
import getpass
import random
import logging
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kvmshell.config import Config, HostConfig, parse_ssh_target
from kvmshell.core.values.cmdline import parse_cmdline, split_props
from kvmshell.core.values.address import Address, Kind, Protocol, SshTarget, uri_host
from kvmshell.core.values.models import QemuVersion
from kvmshell.core.hosts.ssh.connection import (
    DEFAULT_KNOWN_HOSTS, GLOBAL_KNOWN_HOSTS, PasswordPrompt, RemoteResult, SshConnection, SshParams, ssh_connect,
)
from kvmshell.errors import CommandFailed, ConfigError, ConnectFailed, Disconnected, KvmError

log = logging.getLogger(__name__)

QEMU_BINARY = "qemu-system-x86_64"
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

    async def discover(self, host: SshTarget | str) -> list[DiscoveredGuest]:
        """The QEMU guests on ``host`` and their monitors: see the module function ``discover``."""
        return await discover(self, host)

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


# == what runs on a host =========================================================================

@dataclass(frozen=True)
class DiscoveredGuest:
    """A QEMU process found on a host, and the monitor to attach it by (QMP first, unix first)."""

    name: str
    pid: int
    monitor: Address
    monitors: tuple[Address, ...] = ()

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "pid": self.pid, "monitor": str(self.monitor),
                "monitors": [str(m) for m in self.monitors]}


@dataclass(frozen=True)
class HostReport:
    """One line of ``kvmshell hosts``."""

    name: str
    ssh: str
    reachable: bool
    reason: str | None = None
    qemu: QemuVersion | None = None
    qemu_note: str | None = None              # why there is no version
    guests: tuple[DiscoveredGuest, ...] = ()

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "ssh": self.ssh, "reachable": self.reachable, "reason": self.reason,
                "qemu": str(self.qemu) if self.qemu else None, "qemu_note": self.qemu_note,
                "guests": [g.as_dict() for g in self.guests]}


# Every /proc/PID/cmdline that mentions QEMU, each as NUL 0x01 PATH 0x01 then the raw cmdline.
_SCAN = ("for f in $(grep -l -s -a -e qemu-system -e qemu-kvm /proc/[0-9]*/cmdline 2>/dev/null); do "
         "printf '\\000\\001%s\\001' \"$f\"; cat \"$f\" 2>/dev/null; done; true")
_QEMU_RE = re.compile(r"^(qemu-system-[A-Za-z0-9_]+|qemu-kvm)$")
_ON = ("on", "yes", "true", "y")


def _opts(text: str, implied: str | None = None) -> dict[str, str]:
    out: dict[str, str] = {}
    for i, part in enumerate(split_props(text)):
        if "=" in part:
            k, v = part.split("=", 1)
        elif i == 0 and implied:
            k, v = implied, part
        elif part.startswith("no") and part[2:] in ("wait", "server", "delay"):
            k, v = part[2:], "off"
        else:
            k, v = part, "on"
        out[k] = v
    return out


@dataclass
class _Monitor:
    protocol: Protocol
    kind: Kind
    path: str | None = None
    host: str | None = None
    port: int | None = None
    fd: int | None = None


def _listening_host(host: str) -> str:
    """Where to connect to reach a socket bound to ``host`` (an any-address means loopback)."""
    host = host.strip("[]")
    return {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)


def _socket_monitor(protocol: Protocol, o: Mapping[str, str]) -> _Monitor | None:
    """A monitor from ``-chardev socket`` options, if it is a server a client can attach to."""
    if o.get("server", "off") not in _ON or o.get("abstract", "off") in _ON or o.get("telnet", "off") in _ON:
        return None
    if "path" in o:
        return _Monitor(protocol, Kind.UNIX, path=o["path"])
    if "port" in o and o["port"].isdigit():
        return _Monitor(protocol, Kind.TCP, host=_listening_host(o.get("host", "")), port=int(o["port"]))
    if "fd" in o and o["fd"].isdigit():
        return _Monitor(protocol, Kind.UNIX, fd=int(o["fd"]))
    return None


def _legacy_monitor(protocol: Protocol, spec: str, chardevs: Mapping[str, dict[str, str]]) -> _Monitor | None:
    """``-qmp``/``-monitor`` values: ``unix:PATH,server=on``, ``tcp:HOST:PORT,server``, ``chardev:ID``."""
    if spec.startswith("chardev:"):
        o = chardevs.get(spec[len("chardev:"):])
        return _socket_monitor(protocol, o) if o and o.get("backend") == "socket" else None
    first, *rest = split_props(spec)
    flags = _opts(",".join(rest)) if rest else {}
    if first.startswith("unix:"):
        return _socket_monitor(protocol, {**flags, "path": first[len("unix:"):]})
    if first.startswith("tcp:"):
        host, _, port = first[len("tcp:"):].rpartition(":")
        return _socket_monitor(protocol, {**flags, "host": host, "port": port})
    return None


def parse_qemu_cmdline(argv: Sequence[str]) -> tuple[str | None, list[_Monitor]]:
    """QEMU's ``-name`` and its attachable monitors (server sockets), from its argv."""
    name: str | None = None
    chardevs: dict[str, dict[str, str]] = {}
    mons: list[tuple[str, str]] = []             # (chardev id, mode)
    legacy: list[tuple[Protocol, str]] = []
    for opt in parse_cmdline(argv).options:
        value = opt.value
        if value is None:
            continue
        if opt.name == "-name":
            name = _opts(value, "guest").get("guest") or None
        elif opt.name == "-chardev":
            o = _opts(value, "backend")
            if "id" in o:
                chardevs[o["id"]] = o
        elif opt.name == "-mon":
            o = _opts(value, "chardev")
            if "chardev" in o:
                mons.append((o["chardev"], o.get("mode", "readline")))
        elif opt.name in ("-qmp", "-qmp-pretty"):
            legacy.append((Protocol.QMP, value))
        elif opt.name == "-monitor":
            legacy.append((Protocol.HMP, value))
    found: list[_Monitor] = []
    for chardev, mode in mons:
        o = chardevs.get(chardev)
        if o is not None and o.get("backend") == "socket":
            m = _socket_monitor(Protocol.QMP if mode == "control" else Protocol.HMP, o)
            if m is not None:
                found.append(m)
    for protocol, spec in legacy:
        m = _legacy_monitor(protocol, spec, chardevs)
        if m is not None:
            found.append(m)
    return name, found


def _guest_name(name: str | None, pid: int) -> str:
    clean = re.sub(r"[^A-Za-z0-9_.-]", "-", name or "").lstrip("_.-")[:64]
    return clean if clean and clean != "all" else f"qemu-{pid}"


def _parse_scan(data: bytes) -> dict[int, list[str]]:
    procs: dict[int, list[str]] = {}
    for record in data.split(b"\0\x01")[1:]:
        path, sep, raw = record.partition(b"\x01")
        m = re.fullmatch(rb"/proc/(\d+)/cmdline", path)
        if not sep or not m or not raw:
            continue
        argv = [a.decode("utf-8", errors="replace") for a in raw.rstrip(b"\0").split(b"\0")]
        if _QEMU_RE.match(argv[0].rsplit("/", 1)[-1]):
            procs[int(m.group(1))] = argv
    return procs


def _fd_script(wanted: Sequence[tuple[int, int]]) -> str:
    pairs = " ".join(f"{pid}:{fd}" for pid, fd in wanted)
    nets = " ".join(sorted({f"/proc/{pid}/net/unix" for pid, _ in wanted}))
    return (f"for x in {pairs}; do printf '%s %s\\n' \"$x\" \"$(readlink /proc/${{x%:*}}/fd/${{x#*:}} 2>/dev/null)\"; "
            f"done; echo --; cat {nets} /proc/net/unix /proc/1/net/unix 2>/dev/null; true")


def _parse_fds(text: str) -> dict[tuple[int, int], str]:
    """(pid, fd) -> the path of the unix socket that descriptor is, when it is one with a path."""
    links, _, table = text.partition("\n--\n")
    inodes: dict[str, str] = {}
    for line in table.splitlines():
        fields = line.split(None, 7)
        if len(fields) == 8 and fields[6].isdigit() and fields[7].startswith("/"):
            inodes.setdefault(fields[6], fields[7])
    out: dict[tuple[int, int], str] = {}
    for line in links.splitlines():
        key, _, link = line.partition(" ")
        m = re.fullmatch(r"socket:\[(\d+)\]", link.strip())
        pid, _, fd = key.partition(":")
        if m and m.group(1) in inodes and pid.isdigit() and fd.isdigit():
            out[(int(pid), int(fd))] = inodes[m.group(1)]
    return out


_RANK = {(Protocol.QMP, Kind.UNIX): 0, (Protocol.QMP, Kind.TCP): 1, (Protocol.HMP, Kind.UNIX): 2,
         (Protocol.HMP, Kind.TCP): 3}


async def _run_local(command: str) -> RemoteResult:
    proc = await asyncio.create_subprocess_exec("sh", "-c", command, stdin=asyncio.subprocess.DEVNULL,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        async with asyncio.timeout(COMMAND_TIMEOUT):
            out, err = await proc.communicate()
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise ConnectFailed(f"scanning the local QEMU processes took more than {COMMAND_TIMEOUT:g} s") from None
    return RemoteResult(command, proc.returncode or 0, out, err)


async def discover(pool: HostPool | None, host: SshTarget | str | None) -> list[DiscoveredGuest]:
    """The QEMU processes on ``host`` (None: this machine) with their monitor addresses.

    Only server sockets a client can attach to count (unix, TCP; QEMU 7.2+ spellings and the legacy
    ``-qmp``/``-monitor`` ones). Names come from ``-name`` (``qemu-PID`` without one; ``-PID`` added
    when two share a name). Raises the pool's connection errors for a remote host.
    """
    ssh: SshTarget | None = None
    if host is None:
        run = _run_local
    else:
        assert pool is not None, "a remote host needs a HostPool"
        hc = pool.lookup(host)
        ssh = hc.ssh

        async def run(command: str) -> RemoteResult:
            return await pool.run(host, command)
    scan = await run(_SCAN)
    procs = _parse_scan(scan.stdout)
    parsed = {pid: parse_qemu_cmdline(argv) for pid, argv in procs.items()}
    wanted = sorted((pid, m.fd) for pid, (_, mons) in parsed.items() for m in mons if m.fd is not None)
    paths = _parse_fds((await run(_fd_script(wanted))).text) if wanted else {}
    guests: list[tuple[str, int, list[Address]]] = []
    for pid in sorted(parsed):
        name, mons = parsed[pid]
        addrs: list[Address] = []
        for m in mons:
            path = paths.get((pid, m.fd)) if m.fd is not None else m.path
            if m.kind is Kind.UNIX and path:
                addrs.append(Address(m.protocol, Kind.UNIX, path=path, ssh=ssh))
            elif m.kind is Kind.TCP:
                addrs.append(Address(m.protocol, Kind.TCP, host=m.host, port=m.port, ssh=ssh))
        addrs = sorted(dict.fromkeys(addrs), key=lambda a: _RANK[(a.protocol, a.kind)])
        if addrs:
            guests.append((_guest_name(name, pid), pid, addrs))
    counts: dict[str, int] = {}
    for name, _, _ in guests:
        counts[name] = counts.get(name, 0) + 1
    return [DiscoveredGuest(name if counts[name] == 1 else f"{name}-{pid}", pid, addrs[0], tuple(addrs))
            for name, pid, addrs in guests]


_VERSION_RE = re.compile(r"version (\d+)\.(\d+)\.(\d+)\s*(.*)")


async def qemu_version(pool: HostPool, host: SshTarget | str) -> tuple[QemuVersion | None, str | None]:
    """``qemu-system-x86_64 --version`` on the host: the version, or None and why not."""
    result = await pool.run(host, f"{QEMU_BINARY} --version")
    if result.exit_status == 127:
        return None, f"{QEMU_BINARY} not found there"
    m = _VERSION_RE.search(result.text)
    if not result.ok or not m:
        detail = (result.stderr.decode(errors="replace") or result.text).strip().splitlines()
        return None, f"{QEMU_BINARY} --version failed: {detail[0] if detail else result.exit_status}"
    return QemuVersion(int(m.group(1)), int(m.group(2)), int(m.group(3)), m.group(4).strip(" ()")), None


async def survey(pool: HostPool, host: SshTarget | str) -> HostReport:
    """Reachability, QEMU version and the guests found, for one host; never raises KvmError."""
    hc = pool.lookup(host)
    ssh = ssh_text(hc.ssh)
    name = hc.name if hc.name in pool.hosts else ssh
    try:
        await pool.connection(host)
        (version, note), guests = await asyncio.gather(qemu_version(pool, host), discover(pool, host))
    except KvmError as e:
        return HostReport(name, ssh, pool.connected(host), e.message)
    return HostReport(name, ssh, True, None, version, note, tuple(guests))


# -- a free TCP port on a host ---------------------------------------------------------------------

PORTS = (49152, 60999)                # where a free port (an incoming migration, NBD, a probe) is picked


def used_ports(proc_net_tcp: str) -> set[int]:
    """Local ports in /proc/net/tcp{,6} text (any state: a port in TIME_WAIT cannot be bound either)."""
    ports = set()
    for line in proc_net_tcp.splitlines():
        fields = line.split()
        if len(fields) > 2 and ":" in fields[1]:
            try:
                ports.add(int(fields[1].rsplit(":", 1)[1], 16))
            except ValueError:
                continue
    return ports


async def free_port(pool: HostPool, host: SshTarget | str) -> int:
    """A TCP port nothing uses on ``host`` right now (from its /proc/net/tcp), picked at random."""
    r = await pool.run(host, "cat /proc/net/tcp /proc/net/tcp6 2>/dev/null; true")
    used = used_ports(r.text)
    free = [p for p in random.sample(range(PORTS[0], PORTS[1] + 1), 64) if p not in used]
    if not free:
        raise CommandFailed(f"no free TCP port between {PORTS[0]} and {PORTS[1]} on {pool.label(host)}")
    return free[0]
