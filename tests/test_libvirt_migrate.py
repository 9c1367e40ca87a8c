"""Live migration of libvirt guests through libvirt's API, steered by kvmshell, between two test hosts.

Each test host is a network namespace of a ``TestNetwork`` (a veth pair: ``10.213.0.1`` and ``.2``)
with a private ``libvirtd`` in it, in its own mount and UTS namespaces (hostnames ``lv-src`` and
``lv-dst``) and with its own ``host_uuid``, so that libvirt treats them as two hosts. kvmshell holds
both connections over the daemons' unix sockets (in the test's tmp dir, which both mount namespaces
share) and migrates directly (not peer-to-peer: no daemon listens on TCP); QEMU's stream goes over
the veth. The guest's disk lives in that shared tmp dir: shared storage, as libvirt assumes without
--copy-storage (libvirt cannot tell that a plain directory is shared, so the tests pass ``--unsafe``).
"""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import pytest

from tests.libvirtd import TwoHosts, memory_intact, kvmshell, needs_libvirt, needs_netns, state
from tests.waiting import wait_for

try:
    import libvirt
except ImportError:
    pass


@needs_libvirt
@needs_netns
@pytest.mark.qemu
async def test_live_migration_through_libvirt_steered_by_kvmshell(two_hosts: TwoHosts, tmp_path: Path) -> None:
    h = two_hosts
    await h.src.define("m1", ws_pages=512)
    g = f"m1=libvirt:{h.src.uri}#m1"
    rc, out, err = await kvmshell(tmp_path, "--guest", g, "-c", f"migrate --to-host h2 --address {h.net.dst.ip} "
                                  "--unsafe --persistent --undefine-source --downtime 500 --bandwidth 200M",
                                  timeout=120)
    assert rc == 0, err + out
    assert "m1 moved live to h2 through libvirt, attached as m1.h2" in out
    assert re.search(r"completed in [\d.]+ s, downtime \d+ ms, \d+ MB sent", out), out
    assert "decision: t=0.0s start: migrate to qemu:///system?socket=" in out and "action-failed" not in out
    # libvirt's view agrees: the domain runs on the destination, defined there, gone from the source
    assert state(h.src, "m1") is None
    assert state(h.dst, "m1") == (libvirt.VIR_DOMAIN_RUNNING, True)
    assert "source " + h.src.uri + ": no such domain" in out and f"destination {h.dst.uri}: running, persistent" in out
    # the guest's memory arrived whole: read on the destination through libvirt's pass-through
    await memory_intact(h.dst, "m1", 512, tmp_path)
    # and kvmshell sees it there like libvirt does
    rc, out, err = await kvmshell(tmp_path, "--guest", f"m1=libvirt:{h.dst.uri}#m1", "-c", "info status")
    assert rc == 0 and "VM status: running" in out, err


@needs_libvirt
@needs_netns
@pytest.mark.qemu
async def test_stalled_libvirt_migration_is_aborted_and_the_source_runs_on(two_hosts: TwoHosts,
                                                                        tmp_path: Path) -> None:
    h = two_hosts
    dom = await h.src.define("m2", ws_pages=4096)
    g = f"m2=libvirt:{h.src.uri}#m2"
    proc = asyncio.ensure_future(kvmshell(tmp_path, "--guest", g, "-c", f"migrate --to-host h2 --address "
                                          f"{h.net.dst.ip} --unsafe --bandwidth 2M --stall-timeout 3", timeout=120))
    try:
        def moving() -> int:
            try:
                return int(dom.jobStats().get("memory_processed", 0))
            except libvirt.libvirtError:
                return 0
        await wait_for(lambda: asyncio.to_thread(moving), lambda n: n > 0, timeout=60, what="libvirt's job moving")
        await h.net.cut()
        rc, out, err = await proc
    finally:
        if h.net.is_cut:
            await h.net.heal()
        if not proc.done():
            proc.cancel()
    assert rc != 0
    [*_, line] = err.strip().splitlines()
    assert line.startswith("kvmshell: m2: migration through libvirt stalled: cancelled: no progress for 3 s"), err
    # libvirt's own words for the aborted job vary with what QEMU saw first: the abort, or the stream breaking
    assert "m2 is running" in line and "put back" not in line, line
    assert "libvirt: operation aborted" in line or "libvirt: operation failed: job 'migration out' failed" in line, line
    assert re.search(r"libvirt has m2: source qemu:///system\?socket=\S+: running, persistent; destination "
                     r"qemu:///system\?socket=\S+: no such domain", line), line
    assert state(h.src, "m2") == (libvirt.VIR_DOMAIN_RUNNING, True)
    await wait_for(lambda: asyncio.to_thread(state, h.dst, "m2"), lambda s: s is None, timeout=30,
                   what="the destination's domain gone")


@needs_libvirt
@needs_netns
@pytest.mark.qemu
async def test_bad_libvirt_migrations_one_line_nothing_changed(two_hosts: TwoHosts, tmp_path: Path) -> None:
    h = two_hosts
    await h.src.define("t1", persistent=False)
    g = f"t1=libvirt:{h.src.uri}#t1"
    cases = [
        ("migrate --to-host h2 --persistent", "kvmshell: t1: --persistent: t1 is a transient domain (libvirt has "
         "no definition of it to carry or undefine): drop --persistent, or `virsh define` it first; nothing was changed"),
        ("migrate tcp:127.0.0.1:1", "kvmshell: t1: migrate: libvirt manages this guest: migrate it through libvirt "
         "with --to-host HOST ([hosts.HOST] libvirt = URI) or --to libvirt:URI; nothing was changed"),
        ("migrate --to-host nowhere", "kvmshell: t1: --to-host nowhere: no [hosts.nowhere] in the config (hosts: h2)"),
        (f"migrate --to libvirt:qemu:///system?socket={tmp_path}/none", None),
    ]
    for line, expected in cases:
        rc, out, err = await kvmshell(tmp_path, "--guest", g, "-c", line)
        assert rc != 0, line
        [*notes, last] = err.strip().splitlines()
        assert all(n.startswith("kvmshell: note: t1: libvirt marks the domain tainted") for n in notes), err
        if expected is None:
            assert last.startswith(f"kvmshell: t1: libvirt qemu:///system?socket={tmp_path}/none: ") and \
                "No such file" in last, last
        else:
            assert last == expected, last
    # --dry-run checks and says what libvirt would do, and starts nothing
    rc, out, err = await kvmshell(tmp_path, "--guest", g, "-c", f"migrate --to libvirt:{h.dst.uri} --unsafe --dry-run")
    assert rc == 0, err
    assert out.strip() == (f"dry run: libvirt would migrate t1 to {h.dst.uri} ({h.dst.uri}; unsafe; stream to the "
                           "destination host name), strategy auto; nothing was started"), out
    assert state(h.src, "t1") == (libvirt.VIR_DOMAIN_RUNNING, False)
    assert h.dst.domain_names() == []
    # a guest libvirt does not manage: the libvirt choices are refused
    other = await h.src.lab.start("plain", paused=True)
    rc, out, err = await kvmshell(tmp_path, "--guest", other.guest_option, "-c", "migrate --to-host h2 --persistent")
    assert rc != 0 and err.strip().endswith("--persistent is a libvirt migration choice, and libvirt does not "
                                            "manage this guest"), err


@needs_libvirt
@needs_netns
@pytest.mark.qemu
async def test_kvmshells_strategy_switches_libvirts_migration_to_postcopy(two_hosts: TwoHosts, tmp_path: Path) -> None:
    h = two_hosts
    await h.src.define("p1", ws_pages=2048)
    g = f"p1=libvirt:{h.src.uri}#p1"
    rc, out, err = await kvmshell(tmp_path, "--guest", g, "-c", f"migrate --to-host h2 --address {h.net.dst.ip} "
                                  "--unsafe --strategy postcopy --bandwidth 4M", timeout=120)
    assert rc == 0, err + out
    assert re.search(r"decision: t=[\d.]+s postcopy: switching to postcopy: the first full pass is done", out), out
    assert re.search(r"completed in [1-9][\d.]* s, downtime (not reported \(postcopy\)|\d+ ms), [1-9]\d* MB sent", out), out
    assert "action-failed" not in out
    assert "p1 moved live to h2 through libvirt" in out
    assert state(h.src, "p1") == (libvirt.VIR_DOMAIN_SHUTOFF, True)       # libvirt keeps its definition
    assert state(h.dst, "p1") == (libvirt.VIR_DOMAIN_RUNNING, False)      # transient there: no --persistent
    await memory_intact(h.dst, "p1", 2048, tmp_path)

