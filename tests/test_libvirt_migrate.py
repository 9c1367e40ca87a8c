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
import time
from pathlib import Path

import pytest

from kvmshell.core.migration.live.limits import Watchdog
from kvmshell.core.monitor.libvirtmig import job_status, still_cancelling
from kvmshell.core.values.models import MigrationStatus
from kvmshell.lab.launcher import Lab
from tests.libvirtd import TwoHosts, memory_intact, kvmshell, needs_libvirt, needs_netns, state, two_libvirt_hosts
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



def slow_prepare(seconds: int) -> str:
    """A qemu hook for the destination's libvirtd that makes it take ``seconds`` to prepare a domain
    (libvirt runs it with `prepare begin` before it starts the QEMU of an incoming migration): a
    destination whose QEMU takes that long to start, as a loaded host's did."""
    return f'#!/bin/sh\ncat > /dev/null\nif [ "$2" = prepare ]; then sleep {seconds}; fi\nexit 0'


@needs_libvirt
@needs_netns
@pytest.mark.qemu
async def test_libvirt_preparing_the_destination_is_not_a_stall(lab: Lab, tmp_path: Path) -> None:
    """libvirt takes 5 s to start the destination's QEMU, and nothing moves meanwhile: with
    --stall-timeout 1 the migration still completes (the stall clock starts once bytes move)."""
    async with two_libvirt_hosts(lab, tmp_path, dst_hook=slow_prepare(5)) as h:
        await h.src.define("s1", ws_pages=512)
        started = time.monotonic()
        rc, out, err = await kvmshell(tmp_path, "--guest", f"s1=libvirt:{h.src.uri}#s1", "-c",
                                      f"migrate --to-host h2 --address {h.net.dst.ip} --unsafe --persistent "
                                      "--undefine-source --bandwidth 200M --stall-timeout 1", timeout=120)
        took = time.monotonic() - started
        assert rc == 0, err + out
        assert took > 5, took                          # the destination really took its 5 s
        assert "s1 moved live to h2 through libvirt, attached as s1.h2" in out, out
        assert "stalled" not in out + err and "cancel" not in out, out + err
        assert state(h.src, "s1") is None and state(h.dst, "s1") == (libvirt.VIR_DOMAIN_RUNNING, True)
        await memory_intact(h.dst, "s1", 512, tmp_path)


@needs_libvirt
@needs_netns
@pytest.mark.qemu
async def test_a_destination_that_stays_in_preparation_is_aborted_by_the_setup_limit(lab: Lab, tmp_path: Path) -> None:
    """The destination takes 6 s to prepare; --setup-timeout 2 aborts libvirt's job in one line that
    says libvirt was still preparing the destination (libvirt ends the job once the preparation returns,
    within kvmshell's 10 s wait after abortJob); the source runs on, the destination has nothing."""
    async with two_libvirt_hosts(lab, tmp_path, dst_hook=slow_prepare(6)) as h:
        await h.src.define("s2", ws_pages=256)
        rc, out, err = await kvmshell(tmp_path, "--guest", f"s2=libvirt:{h.src.uri}#s2", "-c",
                                      f"migrate --to-host h2 --address {h.net.dst.ip} --unsafe --stall-timeout 1 "
                                      "--setup-timeout 2", timeout=120)
        assert rc != 0, out
        [*_, line] = err.strip().splitlines()
        assert line.startswith("kvmshell: s2: migration through libvirt stalled: cancelled: libvirt has been "
                               "preparing the destination for 2 s: "), err
        assert "(the limit: --setup-timeout); s2 is running; libvirt: operation aborted" in line, line
        assert re.search(r"libvirt has s2: source \S+: running, persistent; destination \S+: no such domain", line), line
        assert state(h.src, "s2") == (libvirt.VIR_DOMAIN_RUNNING, True)
        await wait_for(lambda: asyncio.to_thread(state, h.dst, "s2"), lambda s: s is None, timeout=30,
                       what="the destination's domain gone")


def test_the_stall_clock_starts_when_setup_ends_and_setup_has_its_own_limit() -> None:
    w = Watchdog(1, setup_timeout=5)
    assert not w.setup_overdue(10.0) and not w.setup_overdue(14.9)      # 4.9 s of setup, nothing sent
    assert not w.stuck(0, 15.0) and not w.stuck(0, 15.9)                 # the stall clock starts at 15.0
    assert w.stuck(0, 16.0)
    slow = Watchdog(1, setup_timeout=5)
    assert not slow.setup_overdue(10.0) and slow.setup_overdue(15.0)    # 5 s in setup: over its limit
    # libvirt's job is in setup until QEMU says otherwise and nothing has moved (libvirt prepares the
    # destination); bytes moved or a disk copy under way are progress whatever the events said
    assert job_status("setup", {"type": 2, "time_elapsed": 3000}) is MigrationStatus.SETUP
    assert job_status("setup", {"type": 2, "memory_processed": 4096}) is MigrationStatus.ACTIVE
    assert job_status("setup", {"type": 2, "disk_processed": 1 << 20, "disk_total": 8 << 20}) is MigrationStatus.ACTIVE
    assert job_status("active", {"type": 2}) is MigrationStatus.ACTIVE
    assert job_status("pre-switchover", {"type": 2, "memory_processed": 1}) is MigrationStatus.ACTIVE
    assert job_status("postcopy-active", {"type": 2, "memory_processed": 1}) is MigrationStatus.POSTCOPY_ACTIVE
    # an abort in setup ends when libvirt's preparation of the destination returns: no disk copy to blame
    said = still_cancelling(10, None, preparing=True)
    assert "once the destination's preparation returns" in said and "disk copy" not in said, said
