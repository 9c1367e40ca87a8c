"""Two test hosts on one machine: network namespaces joined by a veth pair, optionally shaped.

``TestNetwork`` is an async context manager for migration tests and benchmarks that need a real
network link between a source and a destination::

    async with TestNetwork(rate="1gbit") as net:
        argv = [*net.exec_prefix(net.dst), "qemu-system-x86_64", ..., "-incoming", f"tcp:{net.dst.ip}:4444"]
        ...
        await net.cut()      # the link silently drops every packet
        await net.heal()     # and carries them again

What it builds, all with iproute2 (``ip``, ``tc``), as root:

* two namespaces, ``<prefix>-<6 hex>-src`` and ``<prefix>-<6 hex>-dst``, each with ``lo`` up;
* a veth pair created straight inside them (``veth-src`` in src, ``veth-dst`` in dst; no device
  ever exists in the root namespace, so names never collide), with the subnet's first two host
  addresses (``10.213.0.1`` and ``10.213.0.2`` by default) and random locally administered MACs;
* a permanent neighbour entry on each side for the other side, so no ARP is ever needed;
* unless ``rate`` is None, a token bucket on the root of both veth ends:
  ``tc qdisc add dev X root tbf rate RATE burst B latency 50ms``, B = 256kb up to 1gbit, 8mb above.

How ``cut()`` works, and why: on the machine this was written on the kernel has ``sch_tbf`` but no
``sch_netem`` ("Specified qdisc kind is unknown"), no tc filter that can drop (the matchall,
flower and basic classifiers and the gact action are missing), and neither ``iptables`` nor
``nft`` is installed (nf_tables is in the kernel; the userspace tool is not). Setting a veth down
would not do either: the connected route goes away with it and sockets get ENETUNREACH at once.
So ``cut()`` rewrites each side's permanent neighbour entry to a MAC the other end does not have.
Frames still leave, reach the peer, and are dropped there by the IP layer as addressed to another
host (``PACKET_OTHERHOST``) - exactly a wire that stopped carrying packets: no ICMP, no RST, no
local error, TCP just retransmits with backoff. ``heal()`` puts the real MACs back; it needs
nothing but ``ip`` and works on any kernel with veth.

Cleanup: ``__aexit__`` deletes both namespaces (which deletes the veth pair), also when
``__aenter__`` failed halfway (it cleans up after itself before re-raising). A namespace that
still has a process in it (say a QEMU started with ``exec_prefix``) loses its name at once but
lives on until that process exits: stop what you started in a host before leaving the block.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import signal
import re
import secrets
import shutil
import subprocess
from dataclasses import dataclass

from kvmshell.errors import LabError

log = logging.getLogger(__name__)

# Token bucket parameters: the bucket must hold at least one full GSO packet (64 KiB) and enough
# to keep a fast link busy between timer wakeups.
TBF_LATENCY = "50ms"
TBF_BURST_SMALL = "256kb"      # rate <= 1gbit
TBF_BURST_LARGE = "8mb"        # rate > 1gbit
_BURST_THRESHOLD_BITS = 1_000_000_000

# tc's rate units (iproute2 tc_util.c), matched without regard to case as tc does:
# "bit" units are bits per second, "bps" units are BYTES per second; no unit means bit.
_RATE_UNITS: dict[str, float] = {
    "": 1, "bit": 1,
    "kibit": 1024, "kbit": 1e3, "mibit": 1024**2, "mbit": 1e6,
    "gibit": 1024**3, "gbit": 1e9, "tibit": 1024**4, "tbit": 1e12,
    "bps": 8, "kibps": 8 * 1024, "kbps": 8e3, "mibps": 8 * 1024**2, "mbps": 8e6,
    "gibps": 8 * 1024**3, "gbps": 8e9, "tibps": 8 * 1024**4, "tbps": 8e12,
}
_RATE_RE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-z]*)\s*$", re.IGNORECASE)
_PREFIX_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,31}$")
_QDISC_UNKNOWN = "qdisc kind is unknown"


class NetnsUnavailable(LabError):
    """Network namespaces (or the shaping they need) cannot be used here; the message says why."""

    title = "netns unavailable"


def netns_available() -> str | None:
    """None when TestNetwork can be tried here, else why not (cheap checks, for pytest.skip)."""
    if os.geteuid() != 0:
        return "not root: network namespaces and veth links need root (CAP_SYS_ADMIN, CAP_NET_ADMIN)"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"`{tool}` not found on PATH (Debian package iproute2)"
    return None


def parse_rate(rate: str) -> int:
    """A tc rate ("50mbit", "1gbit", "125MBps", "1.5gbit") in bits per second; ValueError if bad."""
    m = _RATE_RE.match(rate) if isinstance(rate, str) else None
    if m is None or m.group(2).lower() not in _RATE_UNITS:
        raise ValueError(f"bad rate {rate!r}: want a number and a tc unit such as 50mbit, 1gbit or 125MBps")
    bits = int(float(m.group(1)) * _RATE_UNITS[m.group(2).lower()])
    if bits < 8:
        raise ValueError(f"bad rate {rate!r}: must be at least 8bit")
    return bits


def tbf_burst(bits_per_second: int) -> str:
    return TBF_BURST_SMALL if bits_per_second <= _BURST_THRESHOLD_BITS else TBF_BURST_LARGE


def leftover_namespaces(prefix: str = "kvsh") -> list[str]:
    """Named network namespaces whose name starts with ``prefix`` (from `ip netns list`)."""
    if shutil.which("ip") is None:
        return []
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=False).stdout
    names = (line.split()[0] for line in out.splitlines() if line.strip())
    return sorted(n for n in names if n.startswith(prefix))


@dataclass(frozen=True)
class TestHost:
    """One end of a TestNetwork: its namespace, its address and its veth device in that namespace."""

    __test__ = False     # not a pytest test class, whatever its name says

    name: str
    netns: str
    ip: str
    dev: str


async def _run(*argv: str) -> tuple[int, str]:
    """Run a command; its exit code and its stdout+stderr, stripped."""
    proc = await asyncio.create_subprocess_exec(*argv, stdin=asyncio.subprocess.DEVNULL,
                                                stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.STDOUT)
    out, _ = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode(errors="replace").strip()


async def _check(*argv: str) -> str:
    rc, out = await _run(*argv)
    if rc:
        raise LabError(f"`{' '.join(argv)}` failed (exit {rc}): {out}")
    return out


def _random_mac() -> str:
    b = bytearray(secrets.token_bytes(6))
    b[0] = (b[0] & 0xFC) | 0x02          # locally administered, unicast
    return ":".join(f"{x:02x}" for x in b)


def _other_mac(mac: str) -> str:
    """A MAC that differs from ``mac`` (last octet flipped): frames to it are for another host."""
    octets = mac.split(":")
    octets[-1] = f"{int(octets[-1], 16) ^ 0xFF:02x}"
    return ":".join(octets)


class TestNetwork:
    """Two namespaces, ``src`` and ``dst``, joined by one veth pair; see the module docstring."""

    __test__ = False

    def __init__(self, rate: str | None = "1gbit", *, prefix: str = "kvsh",
                 subnet: str = "10.213.0.0/24") -> None:
        if rate is not None:
            parse_rate(rate)
        if not _PREFIX_RE.match(prefix):
            raise ValueError(f"bad prefix {prefix!r}: letters, digits, '_', '.', '-', at most 32")
        net = ipaddress.ip_network(subnet, strict=True)
        if net.version != 4 or net.num_addresses < 4:
            raise ValueError(f"bad subnet {subnet!r}: want an IPv4 network of /30 or larger")
        self.rate = rate
        self.prefix = prefix
        self.subnet = net
        self.id = f"{prefix}-{secrets.token_hex(3)}"
        self.src = TestHost("src", f"{self.id}-src", str(net.network_address + 1), "veth-src")
        self.dst = TestHost("dst", f"{self.id}-dst", str(net.network_address + 2), "veth-dst")
        self._mac = {self.src.name: _random_mac(), self.dst.name: _random_mac()}
        self._created: list[str] = []
        self._entered = False
        self._cut = False

    @property
    def hosts(self) -> tuple[TestHost, TestHost]:
        return (self.src, self.dst)

    @property
    def is_cut(self) -> bool:
        return self._cut

    def exec_prefix(self, host: TestHost) -> list[str]:
        """argv prefix that runs a command inside ``host``'s namespace."""
        return ["ip", "netns", "exec", host.netns]

    def _peer(self, host: TestHost) -> TestHost:
        return self.dst if host is self.src else self.src

    # --- lifecycle ---------------------------------------------------------------------------

    async def __aenter__(self) -> TestNetwork:
        if self._entered:
            raise LabError(f"test network {self.id} is already set up")
        why = netns_available()
        if why is not None:
            raise NetnsUnavailable(why)
        self._entered = True
        try:
            await self._setup()
        except BaseException:
            await self._teardown(raising=False)
            raise
        log.info("test network %s up: %s=%s, %s=%s, rate %s", self.id, self.src.netns, self.src.ip,
                 self.dst.netns, self.dst.ip, self.rate or "unshaped")
        return self

    async def __aexit__(self, exc_type: object, exc: object, tb: object) -> None:
        await self._teardown(raising=exc_type is None)

    async def _setup(self) -> None:
        for host in self.hosts:
            rc, out = await _run("ip", "netns", "add", host.netns)
            if rc:
                raise NetnsUnavailable(f"the kernel refused a network namespace (`ip netns add {host.netns}`): {out}")
            self._created.append(host.netns)
        src, dst = self.src, self.dst
        rc, out = await _run("ip", "link", "add", "name", src.dev, "address", self._mac[src.name],
                             "netns", src.netns, "type", "veth",
                             "peer", "name", dst.dev, "address", self._mac[dst.name], "netns", dst.netns)
        if rc:
            raise NetnsUnavailable(f"cannot create a veth pair (is CONFIG_VETH set?): {out}")
        plen = self.subnet.prefixlen
        for host in self.hosts:
            ns = host.netns
            await _check("ip", "-n", ns, "link", "set", "lo", "up")
            await _check("ip", "-n", ns, "addr", "add", f"{host.ip}/{plen}", "dev", host.dev)
            await _check("ip", "-n", ns, "link", "set", host.dev, "up")
            await self._set_neighbour(host, self._mac[self._peer(host).name])
        if self.rate is not None:
            for host in self.hosts:
                await self._set_tbf(host, self.rate, "add")

    async def _teardown(self, *, raising: bool) -> None:
        # Shielded: a second cancellation while we clean up must not leave a namespace behind.
        await asyncio.shield(self._delete_namespaces(raising=raising))

    async def _delete_namespaces(self, *, raising: bool) -> None:
        failures = []
        while self._created:
            ns = self._created.pop()
            await self._kill_inside(ns)
            rc, out = await _run("ip", "netns", "del", ns)
            if rc and "No such file" not in out:      # already gone is fine
                failures.append(f"{ns}: {out}")
        self._entered = False
        self._cut = False
        if failures:
            msg = f"could not delete network namespaces: {'; '.join(failures)}"
            if raising:
                raise LabError(msg)
            log.warning("%s", msg)
        else:
            log.info("test network %s removed", self.id)

    @staticmethod
    async def _kill_inside(ns: str) -> None:
        """Nothing outlives its test host: processes still in the namespace (an sshd's session
        process, a QEMU a test forgot) are killed before it goes."""
        rc, out = await _run("ip", "netns", "pids", ns)
        pids = [int(p) for p in out.split() if p.isdigit()] if rc == 0 else []
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if pids:
            log.info("killed %d process(es) left in %s", len(pids), ns)

    def _require_up(self) -> None:
        if not self._entered:
            raise LabError(f"test network {self.id} is not set up (use `async with`)")

    # --- shaping -----------------------------------------------------------------------------

    async def _set_tbf(self, host: TestHost, rate: str, verb: str) -> None:
        bits = parse_rate(rate)
        rc, out = await _run("tc", "-n", host.netns, "qdisc", verb, "dev", host.dev, "root", "tbf",
                             "rate", f"{bits}bit", "burst", tbf_burst(bits), "latency", TBF_LATENCY)
        if rc:
            if _QDISC_UNKNOWN in out:
                raise NetnsUnavailable(f"the kernel has no token bucket filter (sch_tbf): {out}")
            raise LabError(f"cannot shape {host.dev} in {host.netns} to {rate}: {out}")

    async def set_rate(self, rate: str | None) -> None:
        """Change the shaping on both veth ends to ``rate``, or remove it (None)."""
        self._require_up()
        if rate is not None:
            parse_rate(rate)
        for host in self.hosts:
            if rate is not None:
                await self._set_tbf(host, rate, "replace")
            elif self.rate is not None:
                await _check("tc", "-n", host.netns, "qdisc", "del", "dev", host.dev, "root")
        self.rate = rate

    # --- cutting the wire --------------------------------------------------------------------

    async def _set_neighbour(self, host: TestHost, mac: str) -> None:
        await _check("ip", "-n", host.netns, "neigh", "replace", self._peer(host).ip, "lladdr", mac,
                     "dev", host.dev, "nud", "permanent")

    async def cut(self) -> None:
        """Make the link silently drop every packet, both ways (sockets see no error, only silence)."""
        self._require_up()
        for host in self.hosts:
            await self._set_neighbour(host, _other_mac(self._mac[self._peer(host).name]))
        self._cut = True

    async def heal(self) -> None:
        """Undo ``cut()``: the link carries packets again; TCP retransmissions resume on their own."""
        self._require_up()
        for host in self.hosts:
            await self._set_neighbour(host, self._mac[self._peer(host).name])
        self._cut = False
