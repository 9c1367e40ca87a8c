"""What runs on a host (here or over SSH): the QEMU processes, their monitors and command lines, and
free TCP ports.

``discover(pool, host)`` lists the QEMU processes on a host and their monitor sockets, read from
``/proc/*/cmdline`` (and, for monitors QEMU got as a file descriptor, ``/proc/PID/fd`` and
``/proc/net/unix``); ``survey`` adds reachability and QEMU's version, for ``kvmshell hosts``.
``pid_listening_on`` finds the QEMU behind a monitor socket on this host without connecting (a
monitor serves one client at a time, and kvmshell already is that client): the listening unix socket
shows in /proc/net/unix with its path and inode, and the process holding that inode among its file
descriptors is the QEMU. ``free_port`` picks a TCP port nothing uses, here or on a host.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import re
import socket
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from kvmshell.core.values.address import Address, Kind, Protocol, SshTarget, libvirt_monitor_domain
from kvmshell.core.values.cmdline import QemuCommand, parse_cmdline, split_props
from kvmshell.core.values.models import QemuVersion
from kvmshell.core.hosts.pool import COMMAND_TIMEOUT, ssh_text
from kvmshell.core.hosts.shell import HostShell, run_here
from kvmshell.core.hosts.ssh.connection import RemoteResult
from kvmshell.errors import CommandFailed, ConfigError, ConnectFailed, KvmError

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    from kvmshell.core.hosts.pool import HostPool

QEMU_BINARY = "qemu-system-x86_64"


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
    result = await run_here(command, COMMAND_TIMEOUT)
    if result is None:
        raise ConnectFailed(f"scanning the local QEMU processes took more than {COMMAND_TIMEOUT:g} s")
    return result


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
            if libvirt_monitor_domain(path) is not None and name:
                # libvirt's own monitor: offer the guest through libvirt, never this socket
                addrs = []
                try:
                    addrs = [Address.libvirt(name, None if host is None else pool.lookup(host).libvirt_uri())]
                except ConfigError as e:    # no libvirt URI for this host (a jump host): not attachable here
                    log.warning("%s: libvirt's guest %s is left out: %s", host, name, e.message)
                break
            if m.kind is Kind.UNIX and path:
                addrs.append(Address(m.protocol, Kind.UNIX, path=path, ssh=ssh))
            elif m.kind is Kind.TCP:
                addrs.append(Address(m.protocol, Kind.TCP, host=m.host, port=m.port, ssh=ssh))
        addrs = sorted(dict.fromkeys(addrs), key=lambda a: _RANK.get((a.protocol, a.kind), -1))
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


async def source_command(pool: HostPool | None, side: HostShell, address: Address, guest: str, purpose: str
                         ) -> tuple[int, QemuCommand]:
    """The pid and command line of the QEMU behind the monitor at ``address`` (found on its host, ``side``,
    from /proc); ``purpose`` says in an error what it was needed for."""
    host = address.ssh
    found = await discover(pool if host else None, host)
    match = next((g for g in found if any(m.same_target(address) for m in g.monitors)), None)
    if match is None:
        raise CommandFailed(f"cannot find the QEMU process behind {address} on {side.label} (no process there "
                            f"has that monitor socket): its command line is needed to start {purpose}", guest=guest)
    raw = await side.sh(f"cat /proc/{match.pid}/cmdline")
    try:
        return match.pid, parse_cmdline(raw.stdout)
    except ValueError as e:
        raise CommandFailed(f"pid {match.pid} on {side.label}: {e}", guest=guest) from None


# -- the QEMU behind a monitor socket on this host ----------------------------------------------

def socket_inodes(path: str, net_unix: str = "/proc/net/unix") -> set[int]:
    inodes = set()
    real = os.path.realpath(path)
    with open(net_unix, encoding="utf-8", errors="replace") as f:
        next(f, None)
        for line in f:
            fields = line.split()
            if len(fields) >= 8 and fields[7] in (path, real):
                inodes.add(int(fields[6]))
    return inodes


def pid_listening_on(path: str, proc: str = "/proc") -> int | None:
    """The pid of the process holding the unix socket bound at ``path`` (None if none is found)."""
    wanted = {f"socket:[{i}]" for i in socket_inodes(path, f"{proc}/net/unix")}
    if not wanted:
        return None
    for entry in os.listdir(proc):
        if not entry.isdigit():
            continue
        fd_dir = f"{proc}/{entry}/fd"
        try:
            for fd in os.listdir(fd_dir):
                try:
                    if os.readlink(f"{fd_dir}/{fd}") in wanted:
                        return int(entry)
                except OSError:
                    continue
        except OSError:
            continue
    return None


def command_of(pid: int, proc: str = "/proc") -> QemuCommand:
    with open(f"{proc}/{pid}/cmdline", "rb") as f:
        return parse_cmdline(f.read())


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


async def free_port(pool: HostPool | None, host: SshTarget | str | None) -> int:
    """A TCP port nothing uses on ``host`` right now (from its /proc/net/tcp), picked at random; on
    this machine (``host`` None), the one the kernel gives a socket bound to 127.0.0.1 port 0."""
    if host is None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return int(s.getsockname()[1])
    assert pool is not None, "a remote host needs a HostPool"
    r = await pool.run(host, "cat /proc/net/tcp /proc/net/tcp6 2>/dev/null; true")
    used = used_ports(r.text)
    free = [p for p in random.sample(range(PORTS[0], PORTS[1] + 1), 64) if p not in used]
    if not free:
        raise CommandFailed(f"no free TCP port between {PORTS[0]} and {PORTS[1]} on {pool.label(host)}")
    return free[0]
