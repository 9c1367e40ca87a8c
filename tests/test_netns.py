"""TestNetwork: two namespaces joined by a veth pair, shaped with tbf, cut and healed.

Traffic is made by small Python processes started inside the namespaces (no ping, iperf or netcat
is assumed). Each test uses its own namespace prefix, so a check for leftovers never sees the
namespaces of a test running at the same time in another xdist worker.
"""

from __future__ import annotations

import asyncio
import re
import secrets
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest

from kvmshell.errors import LabError
from kvmshell.lab.netns import (NetnsUnavailable, TestHost, TestNetwork, leftover_namespaces,
                                netns_available, parse_rate, tbf_burst)

_WHY = netns_available()
pytestmark = [pytest.mark.skipif(_WHY is not None, reason=_WHY or ""), pytest.mark.timeout(60)]

# Listens on the given address, prints its port, echoes every connection until killed.
ECHO_SERVER = r"""
import socket, sys, threading
s = socket.socket()
s.bind((sys.argv[1], 0))
s.listen(16)
print(s.getsockname()[1], flush=True)
def echo(c):
    with c:
        while (b := c.recv(65536)):
            c.sendall(b)
while True:
    c, _ = s.accept()
    threading.Thread(target=echo, args=(c,), daemon=True).start()
"""

# Reads "COMMAND TIMEOUT" lines; prints ok, timeout or "error ..." for each.
#   connect: open the long-lived connection;  echo: send one byte on it, wait for every byte back;
#   probe: open a fresh connection and close it again.
ECHO_CLIENT = r"""
import socket, sys
addr = (sys.argv[1], int(sys.argv[2]))
conn, sent, got = None, 0, 0
for line in sys.stdin:
    cmd, t = line.split()
    t = float(t)
    try:
        if cmd == "connect":
            conn = socket.create_connection(addr, timeout=t)
        elif cmd == "probe":
            socket.create_connection(addr, timeout=t).close()
        elif cmd == "echo":
            conn.settimeout(t)
            conn.sendall(b"x")
            sent += 1
            while got < sent:
                b = conn.recv(4096)
                if not b:
                    raise EOFError("connection closed")
                got += len(b)
        print("ok", flush=True)
    except TimeoutError:
        print("timeout", flush=True)
    except (OSError, EOFError) as e:
        print("error", type(e).__name__, e, flush=True)
"""

# Prints its port, takes one connection, reads to EOF; prints total bytes, then the bytes and
# seconds from the end of the first read to the last one (so connection setup is not counted).
SINK = r"""
import socket, sys, time
s = socket.socket()
s.bind((sys.argv[1], 0))
s.listen(1)
print(s.getsockname()[1], flush=True)
c, _ = s.accept()
c.settimeout(30)
total = measured = 0
first = last = None
while (b := c.recv(1 << 20)):
    now = time.monotonic()
    if first is None:
        first = now
    else:
        measured += len(b)
    total += len(b)
    last = now
print(total, measured, last - first, flush=True)
"""

SOURCE = r"""
import socket, sys
c = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=30)
c.sendall(bytes(int(sys.argv[3])))
c.close()
"""


@pytest.fixture
def prefix() -> str:
    return f"kvsht{secrets.token_hex(2)}"


@asynccontextmanager
async def network(rate: str | None, prefix: str) -> AsyncIterator[TestNetwork]:
    try:
        async with TestNetwork(rate=rate, prefix=prefix) as net:
            yield net
    except NetnsUnavailable as e:
        pytest.skip(str(e))
    assert leftover_namespaces(prefix) == []


class Proc:
    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc

    async def line(self, timeout: float = 10) -> str:
        assert self.proc.stdout is not None
        raw = await asyncio.wait_for(self.proc.stdout.readline(), timeout)
        assert raw, f"process exited early (rc {await self.proc.wait()})"
        return raw.decode().strip()

    async def ask(self, command: str) -> str:
        assert self.proc.stdin is not None
        self.proc.stdin.write(command.encode() + b"\n")
        await self.proc.stdin.drain()
        return await self.line()


@asynccontextmanager
async def run_in(net: TestNetwork, host: TestHost, script: str, *args: object) -> AsyncIterator[Proc]:
    proc = await asyncio.create_subprocess_exec(
        *net.exec_prefix(host), sys.executable, "-c", script, *map(str, args),
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE)
    try:
        yield Proc(proc)
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()
        assert proc.stdin is not None
        proc.stdin.close()


async def qdiscs(host: TestHost) -> str:
    proc = await asyncio.create_subprocess_exec("tc", "-n", host.netns, "qdisc", "show", "dev", host.dev,
                                                stdout=asyncio.subprocess.PIPE)
    out, _ = await proc.communicate()
    return out.decode()


def tbf_of(shown: str) -> tuple[str, int]:
    """Rate and burst in bytes of the tbf in `tc qdisc show` output ("rate 1Gbit burst 262125b")."""
    m = re.search(r"qdisc tbf .*\brate (\S+) burst (\d+)([KM]?)b\b", shown)
    assert m, f"no tbf in {shown!r}"
    return m.group(1), int(m.group(2)) * {"": 1, "K": 1024, "M": 1024**2}[m.group(3)]


async def transfer_mbit(net: TestNetwork, nbytes: int) -> float:
    """One TCP stream src -> dst of ``nbytes``; the receiver's rate in Mbit/s."""
    async with run_in(net, net.dst, SINK, net.dst.ip) as sink:
        port = await sink.line()
        async with run_in(net, net.src, SOURCE, net.dst.ip, port, nbytes) as source:
            assert await asyncio.wait_for(source.proc.wait(), 30) == 0
            total, measured, seconds = (await sink.line(30)).split()
    assert int(total) == nbytes
    return int(measured) * 8 / float(seconds) / 1e6


def test_parse_rate() -> None:
    assert parse_rate("50mbit") == 50_000_000
    assert parse_rate("1Gbit") == 1_000_000_000
    assert parse_rate("1.5gbit") == 1_500_000_000
    assert parse_rate("125MBps") == 1_000_000_000      # tc: bps means bytes per second
    assert parse_rate("1000") == 1000
    assert tbf_burst(parse_rate("1gbit")) == "256kb"
    assert tbf_burst(parse_rate("10gbit")) == "8mb"
    for bad in ("", "fast", "50 mbits", "-1mbit", "10%", "0bit"):
        with pytest.raises(ValueError):
            parse_rate(bad)
    with pytest.raises(ValueError):
        TestNetwork(rate="lots")
    with pytest.raises(ValueError):
        TestNetwork(subnet="fd00::/64")
    with pytest.raises(ValueError):
        TestNetwork(prefix="a b")


async def test_hosts_reach_each_other(prefix: str) -> None:
    async with network(None, prefix) as net:
        assert sorted(leftover_namespaces(prefix)) == sorted([net.src.netns, net.dst.netns])
        assert net.src.netns.startswith(prefix) and net.src.netns != net.dst.netns
        assert (net.src.ip, net.dst.ip) == ("10.213.0.1", "10.213.0.2")
        assert net.exec_prefix(net.dst) == ["ip", "netns", "exec", net.dst.netns]
        for server, client in ((net.dst, net.src), (net.src, net.dst)):
            async with run_in(net, server, ECHO_SERVER, server.ip) as echo:
                port = await echo.line()
                async with run_in(net, client, ECHO_CLIENT, server.ip, port) as c:
                    assert await c.ask("connect 5") == "ok"
                    assert await c.ask("echo 5") == "ok"
        assert "tbf" not in await qdiscs(net.src)


async def test_two_networks_side_by_side(prefix: str) -> None:
    async with network(None, prefix + "a") as a, network("100mbit", prefix + "b") as b:
        assert len({a.src.netns, a.dst.netns, b.src.netns, b.dst.netns}) == 4
        assert len(leftover_namespaces(prefix)) == 4
        assert a.src.ip == b.src.ip                 # same subnet, separate namespaces: no clash


async def test_shaped_link_limits_throughput(prefix: str) -> None:
    async with network("50mbit", prefix) as net:
        for host in net.hosts:
            assert "rate 50Mbit" in await qdiscs(host)
        mbit = await transfer_mbit(net, 6_000_000)
        assert 25 <= mbit <= 75, f"{mbit:.1f} Mbit/s through a 50mbit link"


async def test_set_rate_changes_both_ends(prefix: str) -> None:
    async with network("1gbit", prefix) as net:
        for host in net.hosts:
            rate, burst = tbf_of(await qdiscs(host))
            assert rate == "1Gbit" and 250_000 < burst <= 256 * 1024
        await net.set_rate("20gbit")
        for host in net.hosts:
            rate, burst = tbf_of(await qdiscs(host))
            assert rate == "20Gbit" and 8_000_000 < burst <= 8 * 1024**2
        await net.set_rate(None)
        for host in net.hosts:
            assert "tbf" not in await qdiscs(host)
        await net.set_rate(None)                    # already unshaped: nothing to do
        await net.set_rate("10mbit")
        for host in net.hosts:
            assert tbf_of(await qdiscs(host))[0] == "10Mbit"


async def test_cut_drops_silently_and_heal_restores(prefix: str) -> None:
    async with network(None, prefix) as net:
        async with run_in(net, net.dst, ECHO_SERVER, net.dst.ip) as echo:
            port = await echo.line()
            async with run_in(net, net.src, ECHO_CLIENT, net.dst.ip, port) as c:
                assert await c.ask("connect 5") == "ok"
                assert await c.ask("echo 5") == "ok"
                await net.cut()
                assert net.is_cut
                assert await c.ask("echo 0.5") == "timeout"     # no error: the bytes just vanish
                assert await c.ask("probe 0.5") == "timeout"    # a SYN gets no answer either
                await net.heal()
                assert not net.is_cut
                assert await c.ask("echo 5") == "ok"            # the retransmission gets through
                assert await c.ask("probe 5") == "ok"


async def test_body_raising_leaves_nothing(prefix: str) -> None:
    with pytest.raises(RuntimeError, match="body failed"):
        async with network("50mbit", prefix) as net:
            assert len(leftover_namespaces(prefix)) == 2
            await net.cut()
            raise RuntimeError("body failed")
    assert leftover_namespaces(prefix) == []


async def test_setup_failing_halfway_leaves_nothing(prefix: str, monkeypatch: pytest.MonkeyPatch) -> None:
    async def broken_tbf(self: TestNetwork, host: TestHost, rate: str, verb: str) -> None:
        assert len(leftover_namespaces(prefix)) == 2     # namespaces and veth exist by now
        raise LabError("tc broke")

    monkeypatch.setattr(TestNetwork, "_set_tbf", broken_tbf)
    net = TestNetwork("1gbit", prefix=prefix)
    with pytest.raises(LabError, match="tc broke"):
        async with net:
            pass
    assert leftover_namespaces(prefix) == []
    with pytest.raises(LabError, match="not set up"):
        await net.cut()


async def test_cancelled_setup_leaves_nothing(prefix: str, monkeypatch: pytest.MonkeyPatch) -> None:
    reached = asyncio.Event()

    async def hanging_tbf(self: TestNetwork, host: TestHost, rate: str, verb: str) -> None:
        reached.set()
        await asyncio.Event().wait()

    monkeypatch.setattr(TestNetwork, "_set_tbf", hanging_tbf)

    async def enter() -> None:
        async with TestNetwork("1gbit", prefix=prefix):
            pass

    task = asyncio.create_task(enter())
    await asyncio.wait_for(reached.wait(), 10)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert leftover_namespaces(prefix) == []
