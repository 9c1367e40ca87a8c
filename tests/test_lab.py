"""The lab itself: the guest dirties memory, the checker catches a lost page, TCG works too."""

from __future__ import annotations

import asyncio
import mmap
from pathlib import Path

import pytest

from kvmshell.core.values.models import MigrationStatus, RunState
from kvmshell.core.monitor.base import open_monitor
from kvmshell.lab import image
from kvmshell.lab.launcher import Lab, MonitorKind
from kvmshell.lab.verify import check_guest_memory
from tests.waiting import free_port, wait_for

pytestmark = pytest.mark.qemu


async def test_checker_catches_a_corrupted_page(lab: Lab, tmp_path: Path) -> None:
    ws = 512
    mem = tmp_path / "guest-ram"
    guest = await lab.start("vm", MonitorKind.QMP_UNIX, ws_pages=ws, mem_file=mem)
    mon = await open_monitor("vm", guest.address)
    try:
        await guest.wait_heartbeats(3)
        good = await check_guest_memory(mon, ws, tmp_path)
        assert good.ok, good.summary()
        assert (await mon.status()).state is RunState.RUNNING        # the check resumed it

        await mon.execute("stop")
        page = 100
        offset = image.WS_BASE + page * image.PAGE_SIZE     # guest RAM is the file, from address 0
        with open(mem, "r+b") as f, mmap.mmap(f.fileno(), 0) as m:
            m[offset] = (m[offset] + 128) % 256            # a stale counter, as if a page was lost
        bad = await check_guest_memory(mon, ws, tmp_path)
        assert not bad.ok
        assert any(f"page {page} " in p for p in bad.problems), bad.problems
        assert (await mon.status()).state is RunState.PAUSED        # stopped before: left stopped
    finally:
        await mon.close()


async def test_tcg_guest_dirties_and_checks(lab: Lab, tmp_path: Path) -> None:
    guest = await lab.start("vm", MonitorKind.HMP_UNIX, ws_pages=256, accel="tcg")
    mon = await open_monitor("vm", guest.address)
    try:
        assert "tcg" in " ".join(guest.proc._transport.get_extra_info("subprocess").args)  # type: ignore[union-attr]
        await guest.wait_heartbeats(5)
        check = await check_guest_memory(mon, 256, tmp_path)
        assert check.ok, check.summary()
    finally:
        await mon.close()


async def test_live_migration_keeps_memory_and_parses_info_migrate(lab: Lab, tmp_path: Path) -> None:
    """A real local migration: the destination's working set passes the checker, and HMP's
    `info migrate` text parses to what QMP's query-migrate says."""
    from kvmshell.core.values import hmptext
    ws = 1024
    src = await lab.start("src", MonitorKind.QMP_UNIX, ws_pages=ws)
    dst = await lab.start("dst", MonitorKind.HMP_UNIX, ws_pages=ws, incoming=True, disk=src.disk)
    s = await open_monitor("src", src.address)
    d = await open_monitor("dst", dst.address)
    try:
        await src.wait_heartbeats(2)
        assert (await d.status()).state is RunState.INMIGRATE
        port = free_port()
        await d.hmp(f"migrate_incoming tcp:127.0.0.1:{port}")
        await s.execute("migrate-set-capabilities",
                        {"capabilities": [{"capability": "events", "state": True}]})
        await s.execute("migrate-set-parameters", {"max-bandwidth": 1 << 40})
        done = asyncio.Event()
        s.subscribe(lambda ev: done.set() if ev.migration_status in
                    (MigrationStatus.COMPLETED, MigrationStatus.FAILED) else None)
        await s.hmp(f"migrate -d tcp:127.0.0.1:{port}")
        async with asyncio.timeout(60):
            await done.wait()
        # QEMU says `completed` a moment before it fills in total-time: wait for the figures to settle
        info = await wait_for(s.migration, lambda m: m.total_time_ms is not None and m.total_time_ms > 0,
                              timeout=10, what="total-time after completion")
        assert info.status is MigrationStatus.COMPLETED, info
        text = hmptext.parse_migrate(await s.hmp("info migrate"))
        assert text.status is MigrationStatus.COMPLETED
        assert text.total_time_ms == info.total_time_ms and text.downtime_ms == info.downtime_ms
        assert info.ram is not None and text.ram is not None
        assert text.ram.total == info.ram.total and text.ram.normal == info.ram.normal
        assert abs(text.ram.transferred - info.ram.transferred) < 1024
        await dst.wait_heartbeats(2)          # the destination runs the guest's loop on
        assert (await d.status()).state is RunState.RUNNING
        check = await check_guest_memory(d, ws, tmp_path)
        assert check.ok, check.summary()
    finally:
        await s.close()
        await d.close()
