"""The monitor core against real QEMU guests, for every monitor kind the launcher offers."""

from __future__ import annotations

import asyncio

import pytest

from kvmshell.core.values.address import Protocol
from kvmshell.core.monitor.hmp import HmpMonitor
from kvmshell.core.values.models import Event, MigrationStatus, RunState
from kvmshell.core.monitor.base import open_monitor
from kvmshell.errors import CommandFailed, Unsupported
from kvmshell.lab.launcher import Lab, MonitorKind

pytestmark = pytest.mark.qemu


@pytest.mark.parametrize("kind", list(MonitorKind), ids=lambda k: k.value)
async def test_attach_every_monitor_kind(lab: Lab, kind: MonitorKind) -> None:
    guest = await lab.start(f"vm-{kind.name.lower()}", kind, paused=True)
    mon = await open_monitor(guest.name, guest.address)
    try:
        assert mon.protocol is kind.protocol
        assert mon.version is not None and mon.version.major >= 7
        status = await mon.status()
        assert status.state is RunState.PRELAUNCH and not status.running
        await mon.hmp("cont")
        assert (await mon.status()).state is RunState.RUNNING
        assert (await mon.migration()).status is MigrationStatus.NONE
        params = await mon.migrate_parameters()
        assert params.max_bandwidth == 128 * 1024 * 1024 and params.downtime_limit_ms == 300
        caps = await mon.migrate_capabilities()
        assert "postcopy-ram" in caps and caps["events"] is False
        # features come from the guest, not from a version table
        assert mon.features.has_hmp("savevm") and mon.features.has_hmp("migrate")
        assert not mon.features.has_hmp("migrate_set_speed")          # removed in QEMU 6.0
        if kind.protocol is Protocol.QMP:
            assert mon.features.has_qmp("query-migrate") and mon.features.has_qmp("human-monitor-command")
    finally:
        await mon.close()


@pytest.mark.parametrize("kind", [MonitorKind.QMP_UNIX, MonitorKind.HMP_UNIX, MonitorKind.HMP_PTY],
                         ids=lambda k: k.value)
async def test_hmp_errors_are_failures_not_output(lab: Lab, kind: MonitorKind) -> None:
    guest = await lab.start("vm", kind, paused=True)
    mon = await open_monitor(guest.name, guest.address)
    try:
        with pytest.raises(CommandFailed, match="unknown command"):
            await mon.hmp("savvm tag1")
        with pytest.raises(CommandFailed, match="Invalid size"):
            await mon.hmp("migrate_set_parameter max-bandwidth -1")
        with pytest.raises(CommandFailed, match="on.*off"):
            await mon.hmp("migrate_set_capability events maybe")
        with pytest.raises(CommandFailed, match="control characters"):
            await mon.hmp("info status\ninfo version")
        # the monitor is still in step after the errors
        assert (await mon.status()).state is RunState.PRELAUNCH
        await mon.hmp("migrate_set_parameter max-bandwidth 1G")
        assert (await mon.migrate_parameters()).max_bandwidth == 1 << 30
    finally:
        await mon.close()


async def test_hmp_monitor_has_no_raw_qmp(lab: Lab) -> None:
    guest = await lab.start("vm", MonitorKind.HMP_TCP, paused=True)
    mon = await open_monitor(guest.name, guest.address)
    try:
        assert isinstance(mon, HmpMonitor)
        with pytest.raises(Unsupported, match="HMP monitor"):
            await mon.execute("query-status")
    finally:
        await mon.close()


async def test_qmp_events_reach_subscribers(lab: Lab) -> None:
    guest = await lab.start("vm", MonitorKind.QMP_UNIX, paused=True)
    mon = await open_monitor(guest.name, guest.address)
    seen: asyncio.Queue[Event] = asyncio.Queue()
    mon.subscribe(seen.put_nowait)
    try:
        await mon.execute("cont")
        await mon.execute("stop")
        names = []
        async with asyncio.timeout(10):
            while names[-1:] != ["STOP"]:
                ev = await seen.get()
                assert ev.guest == "vm" and ev.timestamp > 0
                names.append(ev.name)
        assert names == ["RESUME", "STOP"]
    finally:
        await mon.close()


@pytest.mark.parametrize("kind", [MonitorKind.QMP_UNIX, MonitorKind.HMP_PTY], ids=lambda k: k.value)
async def test_snapshots_round_trip_typed(lab: Lab, kind: MonitorKind) -> None:
    guest = await lab.start("vm", kind, paused=True)
    mon = await open_monitor(guest.name, guest.address)
    try:
        assert await mon.snapshots() == ()
        await mon.hmp("savevm first", timeout=60)
        await mon.hmp("savevm second", timeout=60)
        snaps = await mon.snapshots()
        assert [s.tag for s in snaps] == ["first", "second"]
        assert all(s.vm_state_size > 0 and s.date_sec > 0 for s in snaps)
        await mon.hmp("delvm first", timeout=60)
        assert [s.tag for s in await mon.snapshots()] == ["second"]
    finally:
        await mon.close()


async def test_qmp_and_hmp_text_give_the_same_objects(lab: Lab) -> None:
    """Parse HMP's text (through human-monitor-command) and compare with QMP's structured replies."""
    from kvmshell.core.values import hmptext
    guest = await lab.start("vm", MonitorKind.QMP_UNIX, paused=True)
    mon = await open_monitor(guest.name, guest.address)
    try:
        await mon.hmp("migrate_set_parameter downtime-limit 450")
        await mon.hmp("migrate_set_capability xbzrle on")
        await mon.hmp("savevm snap1", timeout=60)
        assert hmptext.parse_status(await mon.hmp("info status")) == await mon.status()
        qmp_params = await mon.migrate_parameters()
        hmp_params = hmptext.parse_migrate_parameters(await mon.hmp("info migrate_parameters"))
        for name in ("max-bandwidth", "downtime-limit", "cpu-throttle-initial", "multifd-channels",
                     "xbzrle-cache-size", "block-incremental"):
            assert hmp_params.get(name) == qmp_params.get(name), name
        assert hmp_params.downtime_limit_ms == 450
        assert hmptext.parse_migrate_capabilities(await mon.hmp("info migrate_capabilities")) == \
            await mon.migrate_capabilities()
        hmp_snaps = hmptext.parse_snapshots(await mon.hmp("info snapshots"))
        qmp_snaps = await mon.snapshots()
        assert [(s.tag, s.date_sec) for s in hmp_snaps] == [(s.tag, s.date_sec) for s in qmp_snaps]
        assert abs(hmp_snaps[0].vm_state_size - qmp_snaps[0].vm_state_size) <= 0.01 * qmp_snaps[0].vm_state_size
        assert hmptext.parse_version(await mon.hmp("info version")) == mon.version
    finally:
        await mon.close()


async def test_qmp_error_replies_become_command_failures(lab: Lab) -> None:
    guest = await lab.start("vm", MonitorKind.QMP_UNIX, paused=True)
    mon = await open_monitor(guest.name, guest.address)
    try:
        with pytest.raises(CommandFailed, match=r"^vm: migrate-set-parameters: .*downtime") as info:
            await mon.execute("migrate-set-parameters", {"downtime-limit": 10**9})
        assert "\n" not in str(info.value)
        with pytest.raises(CommandFailed, match="nosuch-command"):
            await mon.execute("nosuch-command")
        assert (await mon.status()).state is RunState.PRELAUNCH          # still in step
    finally:
        await mon.close()
