"""The link probe: a short transfer along the migration path, between real network namespaces."""

from __future__ import annotations

import os
import subprocess
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from kvmshell.core.values.address import Address, SshTarget
from kvmshell.core.commands.registry import default_registry
from kvmshell.core.monitor.fleet import Fleet
from kvmshell.core.migration.live.probe import PROBE_BYTES, ProbeFailed, ProbePlan, plan_probe, run_probe
from kvmshell.core.values.uri import MigrationUri
from kvmshell.core.commands.session import Session
from kvmshell.lab.launcher import Lab, LabGuest, MonitorKind
from kvmshell.lab.netns import TestNetwork, netns_available

_WHY = netns_available()
needs_netns = pytest.mark.skipif(_WHY is not None, reason=_WHY or "")
SHAPED = "200mbit"
SHAPED_BYTES = 200e6 / 8


def netns_pids(ns: str) -> set[int]:
    out = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True, check=True).stdout
    return {int(p) for p in out.split()}


def probe_ends_in(*namespaces: str) -> list[int]:
    """The probe's processes (python -c with its program) still running in these namespaces."""
    found = []
    for pid in set().union(*(netns_pids(ns) for ns in namespaces)):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if b"mode, host = sys.argv" in f.read():
                    found.append(pid)
        except OSError:
            continue
    return found


def test_tcp_host_of_a_uri() -> None:
    assert MigrationUri.parse("tcp:10.0.0.2:4444").host == "10.0.0.2"
    assert MigrationUri.parse("tcp:[fd00::2]:4444").host == "fd00::2"
    assert MigrationUri.parse("unix:/run/x.sock").host is None


def test_remote_guests_need_their_host_configured() -> None:
    local = Address.unix("qmp", "/run/vm.qmp")
    remote = Address(local.protocol, local.kind, path=local.path, ssh=SshTarget("hostb"))
    plan, why = plan_probe("a", Address.unix("qmp", "/nonexistent/a.qmp"), "b", remote, None)
    assert plan is None and why is not None
    assert "no process found" in why            # the source is checked first: nothing serves that socket
    plan, why = plan_probe("b", remote, "a", Address.unix("qmp", "/x"), None)
    assert plan is None and why is not None and "over SSH" in why and "no SSH hosts configured" in why


async def test_probe_refuses_an_address_the_destination_does_not_have() -> None:
    with pytest.raises(ProbeFailed, match="could not listen on 192.0.2.77"):
        await run_probe(ProbePlan(None, None, "192.0.2.77", "nowhere"), timeout=20)


@dataclass
class Hosts:
    net: TestNetwork
    src: LabGuest
    dst: LabGuest
    session: Session


@pytest.fixture
async def hosts(lab: Lab) -> AsyncIterator[Hosts]:
    if _WHY is not None:
        pytest.skip(_WHY)
    async with TestNetwork(rate=SHAPED, prefix=f"kvprb{id(lab) % 1000}") as net:
        src = await lab.start("src", MonitorKind.QMP_UNIX, ws_pages=256, pace=1, ram_mib=32,
                              prefix=tuple(net.exec_prefix(net.src)))
        dst = await lab.start("dst", MonitorKind.QMP_UNIX, ws_pages=256, ram_mib=32, incoming=True,
                              disk=src.disk, prefix=tuple(net.exec_prefix(net.dst)))
        try:
            async with Fleet() as fleet:
                fleet.add("src", src.address)
                fleet.add("dst", dst.address)
                await fleet.start()
                session = Session(fleet, default_registry(), assume_yes=True)
                yield Hosts(net, src, dst, session)
                await session.aclose()
        finally:
            await src.kill()
            await dst.kill()


@needs_netns
async def test_probe_between_namespaces_measures_the_shaped_rate(hosts: Hosts) -> None:
    net = hosts.net
    plan = ProbePlan(f"/proc/{hosts.src.pid}/ns/net", f"/proc/{hosts.dst.pid}/ns/net", net.dst.ip, "the veth")
    r = await run_probe(plan)
    assert 0.5 * SHAPED_BYTES <= r.rate <= 1.2 * SHAPED_BYTES, r
    assert 0 < r.bytes <= r.sent <= PROBE_BYTES and 1.0 < r.seconds < 4.0, r
    # nothing of the probe is left in either namespace: only the QEMUs
    assert netns_pids(net.src.netns) == {hosts.src.pid}
    assert netns_pids(net.dst.netns) == {hosts.dst.pid}


@needs_netns
async def test_estimate_says_probed_or_why_not(hosts: Hosts) -> None:
    net, s = hosts.net, hosts.session
    [o] = await s.run_line(f"@src migrate --estimate --to dst tcp:{net.dst.ip}:4444")
    assert o.ok, o.error
    text = o.result.text()
    link = next(line for line in text.splitlines() if line.startswith("link:"))
    assert "probed:" in link and f"TCP to {net.dst.ip}" in link and "network namespace to dst's" in link, link
    mb_s = float(link.split()[1])
    assert 0.5 * SHAPED_BYTES / 1e6 <= mb_s <= 1.2 * SHAPED_BYTES / 1e6, link
    assert "Nothing was started." in text
    assert netns_pids(net.src.netns) == {hosts.src.pid} and netns_pids(net.dst.netns) == {hosts.dst.pid}

    # without a URI kvmshell would use tcp:127.0.0.1, which does not join two namespaces: said, not guessed
    [o] = await s.run_line("@src estimate --to dst")
    assert o.ok, o.error
    link = next(line for line in o.result.text().splitlines() if line.startswith("link:"))
    assert "assumed" in link and "not probed" in link and "different network namespaces" in link, link

    [o] = await s.run_line(f"@src migrate --estimate --to dst --link 1gbit tcp:{net.dst.ip}:4444")
    assert o.ok and "link: 125 MB/s (configured: --link)" in o.result.text()
    [o] = await s.run_line(f"@src migrate --estimate --to dst --link 1gbit --probe tcp:{net.dst.ip}:4444")
    assert not o.ok and "pick one" in (o.error or "")


async def test_estimate_probes_loopback_between_guests_of_one_namespace(lab: Lab) -> None:
    src = await lab.start("src", MonitorKind.QMP_UNIX, ws_pages=256, pace=1, ram_mib=32)
    dst = await lab.start("dst", MonitorKind.HMP_UNIX, ws_pages=256, ram_mib=32, incoming=True, disk=src.disk)
    async with Fleet() as fleet:
        fleet.add("src", src.address)
        fleet.add("dst", dst.address)
        await fleet.start()
        plan, why = plan_probe("src", src.address, "dst", dst.address, None)
        assert why is None and plan is not None and plan.host == "127.0.0.1" and "loopback" in plan.path
        session = Session(fleet, default_registry(), assume_yes=True)
        try:
            [o] = await session.run_line("@src estimate --to dst --no-probe")
            assert o.ok and "not probed: --no-probe" in o.result.text()
            before = set(lab_children())
            [o] = await session.run_line("@src migrate --estimate --to dst")
            assert o.ok, o.error
            link = next(line for line in o.result.text().splitlines() if line.startswith("link:"))
            assert "probed:" in link and "loopback" in link, link
            assert set(lab_children()) <= before           # the probe's processes are gone
            [o] = await session.run_line("@src migrate --to dst --probe")
            assert not o.ok and "--estimate" in (o.error or "")
        finally:
            await session.aclose()


def lab_children() -> list[int]:
    """Live children of this test process (the QEMUs, and the probe's processes while it runs)."""
    me = str(os.getpid())
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if fields[1] == me and fields[0] != "Z":
                out.append(int(entry))
    return out



@needs_netns
@pytest.mark.timeout(120)
async def test_estimate_probes_between_two_ssh_hosts(lab: Lab, tmp_path: Path) -> None:
    """Source on test host a, destination on b (namespaces with their own sshd, the a-b link shaped):
    both ends of the probe run in kvmshell's SSH sessions there, and end there."""
    from tests.sshd import HAVE_SSHD, SshTestbed
    from tests.test_ssh import pool_for, remote

    if not HAVE_SSHD:
        pytest.skip("OpenSSH server not installed (make test installs it)")
    async with SshTestbed(tmp_path / "ssh", ("a", "b")) as bed:
        if bed.net is None:
            pytest.skip("the test hosts are not network namespaces (not root)")
        bed.trust()
        await bed.net.set_rate(SHAPED)
        b_link = bed.net.hosts[1].ip                # b as a reaches it over the shaped link
        spaces = (bed.net.src.netns, bed.net.dst.netns)
        src = await lab.start("psrc", MonitorKind.QMP_UNIX, ws_pages=256, pace=1, ram_mib=32, prefix=bed["a"].prefix)
        dst = await lab.start("pdst", MonitorKind.QMP_UNIX, ws_pages=256, ram_mib=32, incoming=True, disk=src.disk,
                              prefix=bed["b"].prefix)
        try:
            async with Fleet(hosts=pool_for(bed), backoff=(0.05, 0.5)) as fleet:
                fleet.add("psrc", remote(bed, "a", src.address))
                fleet.add("pdst", remote(bed, "b", dst.address))
                await fleet.start()
                session = Session(fleet, default_registry())
                try:
                    [o] = await session.run_line(f"@psrc migrate --estimate --to pdst tcp:{b_link}:4444")
                    assert o.ok, o.error
                    link = next(ln for ln in o.result.text().splitlines() if ln.startswith("link:"))
                    assert "probed:" in link and f"TCP to {b_link}" in link and "SSH session" in link, link
                    mb_s = float(link.split()[1])
                    assert 0.5 * SHAPED_BYTES / 1e6 <= mb_s <= 1.2 * SHAPED_BYTES / 1e6, link
                    assert not probe_ends_in(*spaces), "a probe end outlived the probe"
                    # no URI: kvmshell would migrate to b's SSH address, which a has no route to in this
                    # testbed: the probe finds out, and the estimate says so instead of a figure
                    [o] = await session.run_line("@psrc estimate --to pdst")
                    assert o.ok, o.error
                    link = next(ln for ln in o.result.text().splitlines() if ln.startswith("link:"))
                    assert "not probed: the probe failed" in link and f"to {bed['b'].addr} failed" in link, link
                    assert "Network is unreachable" in link, link
                    assert not probe_ends_in(*spaces), "a probe end outlived the probe"
                finally:
                    await session.aclose()
        finally:
            await src.kill()
            await dst.kill()
