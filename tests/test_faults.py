"""Faults of the migration path that need a real link: the a-b link cut (network namespaces, see
kvmshell/lab/netns.py) during precopy and during postcopy; the destination killed after the switch;
cancel at each phase. tests/FAULTS.md lists every fault and the test that covers it."""

from __future__ import annotations

import asyncio
import os
import random
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from kvmshell.core.values.models import MigrationStatus, RunState
from kvmshell.lab.launcher import Lab, MonitorKind
from kvmshell.lab.netns import TestNetwork
from kvmshell.lab.verify import check_guest_memory
from tests.test_live import RAM, WS, Pair, attached, pair  # noqa: F401  (the fixture)
from tests.test_storage import Rig, no_leftovers_on_source, qcow2, rig, start_pair  # noqa: F401  (rig: the fixture)
from tests.sshd import run
from tests.waiting import wait_for

pytestmark = [pytest.mark.qemu, pytest.mark.timeout(120)]


@pytest.fixture
async def linked(lab: Lab) -> AsyncIterator[tuple[Pair, TestNetwork]]:
    """src in one network namespace, dst (-incoming defer) in another, joined by a 100 Mbit/s link."""
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root")
    async with TestNetwork("100mbit", prefix="kvft") as net:
        src = await lab.start("src", MonitorKind.QMP_UNIX, ws_pages=WS, pace=2, ram_mib=RAM,
                              prefix=tuple(net.exec_prefix(net.src)))
        dst = await lab.start("dst", MonitorKind.QMP_UNIX, ws_pages=WS, ram_mib=RAM, incoming=True, disk=src.disk,
                              prefix=tuple(net.exec_prefix(net.dst)))
        try:
            async with attached(src, dst) as p:
                yield p, net
        finally:
            for g in (src, dst):                     # before the namespaces go
                if g.alive:
                    await g.kill()


def uri(net: TestNetwork) -> str:
    return f"tcp:{net.dst.ip}:{random.randint(20000, 40000)}"


async def test_link_cut_during_precopy_cancels_and_the_source_runs_on(
        linked: tuple[Pair, TestNetwork], tmp_path: Path) -> None:
    p, net = linked
    await p.ok(f"@src migrate --to dst {uri(net)} --bandwidth 2M --stall-timeout 2")
    await p.until_status("active")
    await net.cut()
    ev = await p.finished(timeout=60)
    assert ev.data["status"] == "stalled" and "no progress for 2 s" in ev.data["message"], ev.data
    src = p.session.fleet.monitor("src")
    assert (await src.status()).state is RunState.RUNNING
    check = await check_guest_memory(src, WS, tmp_path)
    assert check.ok, check.summary()
    await net.heal()


async def test_link_cut_before_the_start_trips_the_setup_limit_not_the_stall_clock(
        linked: tuple[Pair, TestNetwork], tmp_path: Path) -> None:
    """QEMU's connection to the destination hangs (the link drops its SYNs): QEMU stays in `setup`,
    which the stall clock (1 s) does not count; --setup-timeout 2 bounds it, in one line; the source
    runs on. QEMU 7.2 cannot cancel a connection attempt: it stays `cancelling` until TCP gives up
    (131 s measured with Linux's default 6 SYN retries), so the source's namespace retries twice (7 s)."""
    p, net = linked
    await run(*net.exec_prefix(net.src), "sysctl", "-q", "-w", "net.ipv4.tcp_syn_retries=2")
    await net.cut()
    try:
        await p.ok(f"@src migrate --to dst {uri(net)} --stall-timeout 1 --setup-timeout 2")
        ev = await p.finished(timeout=60)
    finally:
        await net.heal()
    assert ev.data["status"] == "stalled", ev.data
    assert ev.data["message"].startswith("cancelled: QEMU has been setting up the migration for 2 s: it has not "
                                         "reached the destination"), ev.data
    assert "no progress" not in ev.data["message"] and "src is running" in ev.data["message"], ev.data
    assert [d for d in p.job().decisions if "cancel-stalled" in d] == \
        [d for d in p.job().decisions if "setting up the migration for 2 s" in d], p.job().decisions
    src = p.session.fleet.monitor("src")
    assert (await src.status()).state is RunState.RUNNING
    check = await check_guest_memory(src, WS, tmp_path)
    assert check.ok, check.summary()


async def test_link_cut_during_postcopy_pauses_and_recovers(linked: tuple[Pair, TestNetwork],
                                                            tmp_path: Path) -> None:
    p, net = linked
    await p.ok("@src migrate_set_parameter max-postcopy-bandwidth 1M")      # stay in postcopy a while
    await p.ok(f"@src migrate --to dst {uri(net)} --strategy postcopy --bandwidth 4M --stall-timeout 2")
    await p.until_status("postcopy-active", timeout=60)
    await wait_for(lambda: p.session.fleet.monitor("dst").migration(),      # the guest runs there now
                   lambda m: m.status is MigrationStatus.POSTCOPY_ACTIVE, what="destination in postcopy")
    o = await p.run("@src migrate_cancel")
    assert not o.ok and "cancel refused" in (o.error or ""), o.error
    await net.cut()
    ev = await p.finished(timeout=60)
    assert ev.data["status"] == "postcopy-paused", ev.data
    assert "DANGER" in ev.data["message"] and "no progress for 2 s" in ev.data["message"], ev.data
    assert any("pause-stalled" in d for d in p.job().decisions), p.job().decisions
    await net.heal()
    # the destination learns of the pause once the link carries the source's FIN again
    await wait_for(lambda: p.session.fleet.monitor("dst").migration(),
                   lambda m: m.status is MigrationStatus.POSTCOPY_PAUSED, timeout=60, what="destination paused")
    again = uri(net)
    await p.ok(f"@dst migrate_recover {again}")
    await p.ok("@src migrate_set_parameter max-postcopy-bandwidth 1G")
    await p.ok(f"@src migrate -r {again}")
    await p.until_status("completed", timeout=60)
    await p.dst.wait_heartbeats(2)
    check = await check_guest_memory(p.session.fleet.monitor("dst"), WS, tmp_path)
    assert check.ok, check.summary()


async def test_destination_killed_after_the_switch_the_source_comes_back(pair: Pair, tmp_path: Path) -> None:  # noqa: F811 (the fixture)
    await pair.ok("@src migrate --to dst")
    ev = await pair.finished()
    assert ev.data["status"] == "completed" and "`cont` there brings the guest back" in ev.data["message"], ev.data
    src = pair.session.fleet.monitor("src")
    assert (await src.status()).state is RunState.POSTMIGRATE
    os.kill(pair.dst.pid, signal.SIGKILL)
    async with asyncio.timeout(10):
        await pair.dst.proc.wait()               # its image locks go with the process
    await pair.ok("@src cont")
    assert (await src.status()).running
    await pair.src.wait_heartbeats(2)
    check = await check_guest_memory(src, WS, tmp_path)
    assert check.ok, check.summary()


async def test_cancel_before_during_and_after(pair: Pair) -> None:  # noqa: F811 (the fixture)
    text = await pair.ok("@src migrate_cancel")
    assert "no migration to cancel" in text, text
    await pair.ok("@src migrate --to dst --bandwidth 2M --stall-timeout 60")
    await pair.until_status("active")
    await pair.ok("@src migrate_cancel")
    assert (await pair.finished()).data["status"] == "cancelled"
    src = pair.session.fleet.monitor("src")
    assert (await src.status()).running
    text = await pair.ok("@src migrate_cancel")
    assert "no migration to cancel (status: cancelled)" in text, text


# -- the disk copy (migrate --copy-storage): the rig of tests/test_storage.py -----------------------

async def test_cancel_while_the_disks_are_mirrored_undoes_everything(rig: Rig) -> None:  # noqa: F811 (the fixture)
    w = rig.lab.workdir
    await start_pair(rig, await qcow2(w / "src-data.qcow2"), await qcow2(w / "dst-data.qcow2"))
    await rig.io("src", "write -P 0x31 0 8M")                 # 8 MiB at 4 MB/s: the mirror takes a while
    await rig.ok("@src migrate --to dst --copy-storage all --bandwidth 4M")
    await wait_for(lambda: asyncio.sleep(0, rig.stage().disks), lambda ds: any(d.offset > 0 for d in ds),
                   what="the mirror under way", every=0.02)
    text = await rig.ok("@src migrate_cancel")
    assert "cancelled" in text, text
    ev = await rig.finished()
    assert ev.data["status"] == "cancelled" and "before the migration started" in ev.data["message"], ev.data
    src = rig.mon("src")
    assert (await src.status()).state is RunState.RUNNING
    assert (await src.migration()).status.value == "none"      # `migrate` was never sent
    await no_leftovers_on_source(rig)
    dst = rig.mon("dst")
    assert (await dst.status()).state is RunState.INMIGRATE
    assert await dst.execute("query-block-exports") == []      # the NBD export went
    await rig.io("src", "read -P 0x31 0 8M")                   # the source's disk as it was


async def test_destination_disk_full_during_the_mirror(rig: Rig, tmp_path: Path) -> None:  # noqa: F811 (the fixture)
    """The destination's image sits on a 2 MiB tmpfs: the mirror's writes fail with ENOSPC there."""
    small = tmp_path / "small"
    small.mkdir()
    await run("mount", "-t", "tmpfs", "-o", "size=2M", "tmpfs", str(small))
    try:
        w = rig.lab.workdir
        await start_pair(rig, await qcow2(w / "src-data.qcow2"), await qcow2(small / "dst-data.qcow2"))
        await rig.io("src", "write -P 0x41 0 8M")                 # 8 MiB into 2 MiB of room
        await rig.ok("@src migrate --to dst --copy-storage all")
        ev = await rig.finished()
        msg = ev.data["message"]
        assert ev.data["status"] == "failed" and "not started" in msg, ev.data
        assert "write error on dst's side" in msg and "src runs on as before" in msg, msg
        src = rig.mon("src")
        assert (await src.status()).state is RunState.RUNNING
        assert (await src.migration()).status.value == "none"
        await no_leftovers_on_source(rig)
        await rig.io("src", "read -P 0x41 0 8M")
        await rig.quit("src", "dst")
    finally:
        await run("umount", "-l", str(small), check=False)


async def test_copy_storage_onto_the_very_same_file_is_refused(rig: Rig) -> None:  # noqa: F811 (the fixture)
    """Guests that share their image (shared storage, like the demo's): --copy-storage would mirror a
    disk onto itself through NBD, with two QEMUs writing one qcow2."""
    src = await rig.lab.start("src", MonitorKind.QMP_UNIX, ws_pages=WS, pace=2, ram_mib=RAM)
    await rig.attach("src", src)
    await rig.attach("dst", await rig.lab.start("dst", MonitorKind.QMP_UNIX, ws_pages=WS, ram_mib=RAM,
                                                incoming=True, disk=src.disk))
    o = await rig.run("@src migrate --to dst --copy-storage all")
    assert not o.ok and "is the very file the source uses" in (o.error or ""), o.error
    assert (await rig.mon("src").status()).running
    assert (await rig.mon("src").migration()).status is MigrationStatus.NONE
    assert await rig.mon("dst").execute("query-block-exports") == []
