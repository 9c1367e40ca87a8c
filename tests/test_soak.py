"""The soak and load benches in short (bench/soak.py, bench/load.py): nothing lost, nothing growing."""

from __future__ import annotations

import asyncio
import os
import select
import signal

import pytest

from kvmshell.core.commands.registry import default_registry
from kvmshell.core.commands.session import HISTORY_KEEP, Session
from kvmshell.core.monitor.base import open_monitor
from kvmshell.core.monitor.fleet import Fleet
from kvmshell.core.values.models import Event
from kvmshell.errors import Disconnected
from kvmshell.lab.launcher import Lab, MonitorKind
from kvmshell.tui.app import KvmshellApp
from kvmshell.tui.history import History
from kvmshell.tui.messages import GuestEvent
from kvmshell.tui.source import SessionSource
from tests.conftest import needs_qemu
from tests.test_corpus import bench_module
from tests.waiting import wait_for


@pytest.mark.timeout(300)
@pytest.mark.qemu
@needs_qemu
async def test_twelve_migrations_with_a_cancel_and_a_killed_destination_lose_nothing() -> None:
    soak = bench_module("soak")
    run = await soak.soak(12, cancel_every=10, kill_every=11)
    rows = run.rows
    assert [r.kind for r in rows].count("cancel") == 1 and [r.kind for r in rows].count("kill") == 1
    assert {r.strategy for r in rows if r.kind == "migrate"} == set(soak.STRATEGIES)
    bad = [soak.row_line(r) for r in rows if not r.ok]
    assert not bad, bad
    assert all(r.memcheck == "ok" for r in rows) and run.extra_finished == 0 and run.lingered == 0
    assert all(r.settings == "as before" for r in rows if r.kind != "migrate")
    # past the first migrations (imports, first connections) the counts stay where they are
    settled = rows[2:]
    assert max(r.fds for r in settled) - min(r.fds for r in settled) <= 1, [r.fds for r in rows]
    assert max(r.tasks for r in settled) == min(r.tasks for r in settled), [r.tasks for r in rows]
    assert rows[-1].rss_kib - rows[2].rss_kib < 16 * 1024, [r.rss_kib for r in rows]


def test_trend_tells_growth_from_noise() -> None:
    soak = bench_module("soak")
    assert not soak.trend("flat", [10, 11, 10, 11, 10, 11] * 25).grows
    assert soak.trend("leak", [10 + i for i in range(150)]).grows
    slow = soak.trend("slow leak", [100 + i // 10 + (i % 2) for i in range(150)], floor=0.5)
    assert slow.grows and 0.05 < slow.slope < 0.15


@pytest.mark.timeout(300)               # booting 20 guests on a loaded, shared machine can take a while
@pytest.mark.qemu
@needs_qemu
async def test_twenty_guests_answer_at_all_and_three_migrate_at_once() -> None:
    load = bench_module("load")
    res = await load.load(20, migrations=3, rounds=2, tui_seconds=0, say=False, settle=False, dash=False)
    assert res.guests == 20
    assert res.at_all_answered == [20, 20]
    assert res.events_received == res.events_expected == {"STOP": 40, "RESUME": 40}, res.events_missing_guests
    assert (res.shell_exit, res.shell_answered) == (0, 20)
    assert res.migration_status == {f"src{i}": "completed" for i in range(3)}
    assert res.migration_memcheck == {f"src{i}": "ok" for i in range(3)}
    assert res.ok


@pytest.mark.timeout(300)
@pytest.mark.qemu
@needs_qemu
async def test_the_dashboard_follows_two_migrations_and_two_quits_among_ten_guests() -> None:
    """bench/load.py step 6 in short: 10 guests (3 on HMP), the dashboard in-process over the session,
    2 migrations typed into its bar, 2 guests quit (one HMP, one QMP): nothing dropped."""
    load = bench_module("load")
    res = await load.load(10, migrations=2, rounds=1, tui_seconds=0, shell=False, say=False, settle=False,
                          hmp=3, quits=2, dash_idle=1, bandwidth="16M", pane_gap=10)
    assert res.hmp_guests == 3 and res.hmp_state_ok == res.hmp_state_expected == 6
    assert res.events_received == res.events_expected == {"STOP": 7, "RESUME": 7}
    d = res.dash
    assert d is not None
    assert d.migration_status == {"dst0": "completed", "dst1": "completed"}, d.migration_status
    assert d.migration_memcheck == {"dst0": "ok", "dst1": "ok"}
    assert all(d.row_final_lag_s[s] < 10 for s in d.migration_status), d.row_final_lag_s   # the outcome shown
    assert all(ev[-1] == "completed" and "active" in ev for ev in d.migration_events.values()), d.migration_events
    assert sorted(d.shown_gone) == sorted(d.quit) and len(d.quit) == 2
    # the QMP one (HMP sends none), exactly once: a poll written as QEMU exited used to lose it
    # (test_a_command_written_as_qemu_exits_loses_not_its_shutdown)
    assert list(d.shutdown_events.values()) == [1], d.shutdown_events
    assert d.fleet_events > 0 and d.app_events == d.fleet_events and not d.dropped
    assert res.ok, load.dash_lines(d)


async def test_a_long_session_keeps_a_bounded_history() -> None:
    """Session.history kept every line ever run: the soak's only growth that was kvmshell's own (about
    70 bytes a line, found with tracemalloc over 60 migrations). It keeps the recent lines now."""
    async with Fleet() as fleet:
        session = Session(fleet, default_registry())
        for n in range(2 * HISTORY_KEEP + 10):
            await session.run_line(f"help {'migrate' if n % 2 else 'stop'}")
        assert len(session.history) <= 2 * HISTORY_KEEP
        assert len(session.history) >= HISTORY_KEEP
        assert session.history[-1] == "help migrate"
        await session.aclose()


@pytest.mark.qemu
@needs_qemu
async def test_an_hmp_command_queued_behind_a_quit_says_disconnected(lab: Lab) -> None:
    """Found by bench/load.py: the dashboard's poll asked an HMP guest for its status while `quit` held
    its monitor; the fleet closed the monitor on QEMU's exit before the poll got its turn, and the poll
    wrote to no stream (AttributeError, not a kvmshell error): the worker's exception ended the app."""
    guest = await lab.start("vm", MonitorKind.HMP_UNIX, paused=True)
    mon = await open_monitor(guest.name, guest.address)
    try:
        holder = asyncio.create_task(mon.raw("quit"))        # holds the monitor until QEMU has gone
        queued = asyncio.create_task(mon.status())
        await mon.wait_closed()
        await mon.close()                                     # what the fleet does when its monitor closes
        with pytest.raises(Disconnected):
            await holder
        with pytest.raises(Disconnected):
            await queued
    finally:
        await mon.close()


async def test_an_event_that_arrives_as_the_dashboard_closes_is_let_go() -> None:
    """Found by bench/load.py: quit guests kept the fleet's reconnect events coming while the dashboard
    closed; one handled after its widgets had gone raised NoMatches, which textual reports as the app's
    crash. The app lets such an event go (as its view timer does)."""
    async with Fleet() as fleet:
        session = Session(fleet, default_registry())
        app = KvmshellApp(SessionSource(session, history=History()))
        async with app.run_test(size=(80, 24)) as pilot:
            await pilot.pause()
            assert app.events_log is not None
        # the widgets are gone; the app's fleet subscription goes only after them
        app.on_guest_event(GuestEvent(Event("vm", "kvmshell.DISCONNECTED", {"reason": "gone"}, 0.0)))
        await session.aclose()


@pytest.mark.qemu
@needs_qemu
async def test_a_qmp_monitor_keeps_no_event_it_has_passed_on(lab: Lab) -> None:
    """Found by the soak's tracemalloc (strings decoded by qemu.qmp, ~0.4 KiB a migration): qemu.qmp's
    EventListener keeps every event it heard in a history list for the connection's life, and the
    client's default listener (``client.events``) also queues them for a reader kvmshell is not. On a
    monitor attached for weeks both grew without bound. Every event is delivered; none is kept."""
    guest = await lab.start("vm", MonitorKind.QMP_UNIX)
    mon = await open_monitor(guest.name, guest.address)
    seen: list[str] = []
    mon.subscribe(lambda ev: seen.append(ev.name))
    try:
        for _ in range(10):
            await mon.stop()
            await mon.cont()
        async def resumed() -> int:
            return seen.count("RESUME")
        await wait_for(resumed, lambda n: n >= 10, timeout=10, what="10 RESUME events")
        assert seen.count("STOP") == 10
        client = mon._client                     # qemu.qmp's own: what its listeners still hold
        assert client is not None
        kept = sum(len(listener.history) + (0 if listener.empty() else 1) for listener in client._listeners)
        assert kept == 0, f"{kept} events kept by qemu.qmp's listeners"
    finally:
        await mon.close()


@pytest.mark.qemu
@needs_qemu
async def test_a_command_written_as_qemu_exits_loses_not_its_shutdown(lab: Lab) -> None:
    """Found by bench/load.py (once in a full run, no SHUTDOWN from a QMP guest it quit): QEMU writes
    SHUTDOWN and closes its monitor as it exits; a poll written after that close fails (EPIPE), and
    asyncio's transport answers a failed write by dropping its reader at once, the unread SHUTDOWN with
    it. Made certain here: the poll is queued for qemu.qmp's writer, QEMU is told to exit (SIGTERM: it
    sends SHUTDOWN as on `quit`), and the loop is held until QEMU has hung up, so the write comes first."""
    guest = await lab.start("vm", MonitorKind.QMP_UNIX, paused=True)
    mon = await open_monitor(guest.name, guest.address)
    seen: list[str] = []
    mon.subscribe(lambda ev: seen.append(ev.name))
    try:
        assert mon._client is not None and mon._client._writer is not None
        hangup = select.poll()
        hangup.register(mon._client._writer.get_extra_info("socket").fileno(), 0)   # hang-up only
        poll = asyncio.create_task(mon.status())
        await asyncio.sleep(0)                       # the poll has run up to qemu.qmp's queue
        os.kill(guest.pid, signal.SIGTERM)
        events = hangup.poll(10_000)                 # the loop held (nothing read) until QEMU has closed
        assert events and events[0][1] & select.POLLHUP, events
        with pytest.raises(Disconnected):
            await poll
        await asyncio.wait_for(mon.wait_closed(), 10)
        assert seen.count("SHUTDOWN") == 1, seen
    finally:
        await mon.close()
