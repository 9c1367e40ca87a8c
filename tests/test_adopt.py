"""A migration goes on in QEMU when the kvmshell that started it dies (kill -9): a new kvmshell shows
it as not followed and `migrate --follow` adopts it: the sampler, the model, the watchdog and, from
the dead kvmshell's state file, its strategy and its undo (the settings put back on both sides).
Also: a migration started by hand with plain QMP (no state file), the refusals, postcopy-paused.
Real `kvmshell` processes and real lab guests (the rig of tests/test_scripts.py)."""

from __future__ import annotations

import json
import os
import signal
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from kvmshell.config import Config
from kvmshell.core.commands.registry import default_registry
from kvmshell.core.commands.session import Session
from kvmshell.core.migration.live import running
from kvmshell.core.monitor.base import Monitor
from kvmshell.core.monitor.fleet import Fleet
from kvmshell.core.values.address import Address
from kvmshell.core.values.models import MigrationStatus, ParamValue
from kvmshell.lab.launcher import Lab
from kvmshell.lab.verify import check_guest_memory
from kvmshell.tui.views import Badge, badge_for_info
from tests.test_cli import kvmshell
from tests.test_scripts import Guests, guests, started
from tests.test_tui import attach as tui_attach, rig as tui_rig, until as tui_until
from tests.waiting import free_port, wait_for

pytestmark = [pytest.mark.qemu, pytest.mark.timeout(180)]
WS = 4096                        # 16 MiB working set: half a minute at 512 KiB/s, under a second once uncapped
Settings = tuple[Mapping[str, bool], Mapping[str, ParamValue]]


async def settings(mon: Monitor) -> Settings:
    return dict((await mon.migrate_capabilities()).states), dict((await mon.migrate_parameters()).values)


def state_files(tmp_path: Path) -> list[Path]:
    """The state files the `kvmshell` processes of the test wrote (XDG_STATE_HOME of tests/test_cli.env_for)."""
    return sorted((tmp_path / "state" / "kvmshell" / "running").glob("*.json"))


@asynccontextmanager
async def attached(*named: tuple[str, Address]) -> AsyncIterator[Fleet]:
    async with Fleet() as fleet:
        for name, addr in named:
            fleet.add(name, addr)
        await fleet.start()
        yield fleet


async def uncap(g: Guests) -> None:
    """Let the migration finish (as a second admin would): the undo must put the cap back anyway."""
    await g.side.set_parameters({"max-bandwidth": 1 << 30})


@pytest.mark.parametrize("ends", ["kill -9", "--detach"])
async def test_kill_9_then_follow_adopts_finishes_and_puts_both_sides_back(lab: Lab, tmp_path: Path, ends: str) -> None:
    """The issue's case (kill -9), and a kvmshell that left the migration to QEMU on purpose (--detach)."""
    async with guests(lab, tmp_path, ws=WS) as g:
        await g.side.set_parameters({"cpu-throttle-initial": 35, "downtime-limit": 400})    # the user's own
        src_before = await settings(g.side)
        async with attached(("dst", g.dst.address)) as fleet:
            dst_before = await settings(fleet.monitor("dst"))
        line = "@src migrate --to dst --strategy converge --bandwidth 512K --stall-timeout 60"
        if ends == "--detach":
            rc, out, err = await kvmshell(tmp_path, *g.args, "-c", line + " --detach")
            assert rc == 0 and "`migrate --follow` takes it back" in err, err
            [path] = state_files(tmp_path)
            first_pid = json.loads(path.read_text())["pid"]
        else:
            async with started(tmp_path, *g.args, "-c", line) as first:
                await g.until(MigrationStatus.ACTIVE)
                await wait_for(lambda: _async(state_files(tmp_path)), bool, what="the state file")
                [path] = state_files(tmp_path)
                first.proc.send_signal(signal.SIGKILL)
                assert await first.proc.wait() == -signal.SIGKILL
                first_pid = first.proc.pid
        state = json.loads(path.read_text())
        assert state["pid"] == first_pid and state["strategy"] == "converge", state
        assert state["before"]["source"]["capabilities"]["auto-converge"] is False, state
        assert state["before"]["source"]["parameters"]["cpu-throttle-initial"] == 35, state
        assert state["before"]["source"]["parameters"]["max-bandwidth"] == 128 << 20, state
        assert await g.status() is MigrationStatus.ACTIVE          # QEMU goes on, unsteered
        assert (await settings(g.side))[1]["max-bandwidth"] == 1 << 19
        rc, out, err = await kvmshell(tmp_path, *g.args, "-c", "@src info migrate")
        assert rc == 0, err
        assert "not followed: `migrate --follow` adopts it" in out and \
            f"started by kvmshell pid {first_pid} (gone), strategy converge" in out, out
        rc, out, err = await kvmshell(tmp_path, *g.args, "guests")
        assert rc == 0, err
        [src_row] = [line for line in out.splitlines() if line.startswith("src ")]
        assert "running, migration active (not followed: `migrate --follow` adopts it)" in src_row, out
        async with started(tmp_path, *g.args, "-c", "@src migrate --follow") as second:
            said = await second.line(lambda text: "adopted" in text)
            assert f"started by kvmshell pid {first_pid} (gone): strategy converge resumes" in said, said
            await wait_for(lambda: _async(json.loads(path.read_text())["pid"]), lambda pid: pid == second.proc.pid,
                           what="the state file taken over by the adopter")
            await uncap(g)
            rc, out, err = await second.end()
        assert rc == 0, err
        assert out.startswith("src: completed in ") and "migration settings put back: on src " in out, out
        assert await settings(g.side) == src_before
        assert state_files(tmp_path) == []
    async with attached(("dst", g.dst.address)) as fleet:
        dst = fleet.monitor("dst")
        caps, params = await settings(dst)
        assert params == dst_before[1]
        assert {k: v for k, v in caps.items() if k != "events"} == \
            {k: v for k, v in dst_before[0].items() if k != "events"}      # events kept on: the guest runs there
        check = await check_guest_memory(dst, WS, tmp_path)
        assert check.ok, check.problems


async def _async(value: object) -> object:
    return value


async def plain_migration(g: Guests, *, postcopy: bool = False, bandwidth: int = 1 << 19) -> Fleet:
    """A migration started by hand over plain QMP (no kvmshell): the destination's fleet, to close."""
    fleet = Fleet()
    fleet.add("dst", g.dst.address)
    await fleet.start()
    dst = fleet.monitor("dst")
    if postcopy:
        await dst.set_capabilities({"postcopy-ram": True})
        await g.side.set_capabilities({"postcopy-ram": True})
    uri = f"tcp:127.0.0.1:{free_port()}"
    await dst.migrate_incoming(uri)
    await g.side.set_parameters({"max-bandwidth": bandwidth})
    await g.side.migrate(uri)
    await g.until(MigrationStatus.ACTIVE)
    return fleet


async def test_follow_without_a_state_file_observes_to_the_end(lab: Lab, tmp_path: Path) -> None:
    async with guests(lab, tmp_path, ws=WS) as g:
        fleet = await plain_migration(g)
        try:
            async with started(tmp_path, "--guest", f"src={g.src.address}", "-c", "@src migrate --follow") as k:
                said = await k.line(lambda text: "following" in text)
                assert "no state file" in said and "strategy none" in said and "cannot be put back" in said, said
                await wait_for(lambda: _async(state_files(tmp_path)), bool, what="the adopter's state file")
                await uncap(g)
                rc, out, err = await k.end()
            assert rc == 0, err
            assert out.startswith("src: completed in "), out
            assert state_files(tmp_path) == []
            check = await check_guest_memory(fleet.monitor("dst"), WS, tmp_path)
            assert check.ok, check.problems
        finally:
            await fleet.aclose()


async def test_follow_refuses_in_one_line(lab: Lab, tmp_path: Path) -> None:
    async with guests(lab, tmp_path, ws=WS) as g:
        src = ("--guest", f"src={g.src.address}")
        rc, out, err = await kvmshell(tmp_path, *src, "-c", "@src migrate --follow")
        assert rc == 1 and err.count("\n") == 1, err
        assert "no migration of this guest is running (none): nothing to follow" in err, err
        rc, out, err = await kvmshell(tmp_path, *src, "-c", "@src migrate --follow --to dst")
        assert rc != 0 and err.count("\n") == 1 and "--follow adopts the running migration as it is: drop --to" \
            in err, err
        fleet = await plain_migration(g)
        try:
            # a live kvmshell (here: this test's process) owns the state file
            mine = tmp_path / "state" / "kvmshell" / "running" / running.path_for(str(g.src.address)).name
            mine.parent.mkdir(parents=True)
            mine.write_text(json.dumps({"source": "src", "source_address": str(g.src.address), "strategy": "auto",
                                        "pid": os.getpid()}))
            rc, out, err = await kvmshell(tmp_path, *src, "-c", "@src migrate --follow")
            assert rc == 1 and err.count("\n") == 1, err
            assert f"kvmshell pid {os.getpid()} follows this migration already" in err, err
            mine.unlink()
            # the receiving side
            dst_session = Session(fleet, default_registry(), Config())
            [o] = await dst_session.run_line("@dst migrate --follow")
            assert not o.ok and "this guest receives the migration" in (o.error or ""), o.error
            # the same session twice; a state file about an older migration (a live pid, even) is set aside
            running.write(running.RunningFile(source="src", source_address=str(g.src.address), strategy="auto",
                                              pid=os.getpid(), started_at=1.0))
            async with attached(("src", g.src.address)) as ours:
                session = Session(ours, default_registry(), Config())
                try:
                    [o] = await session.run_line("@src migrate --follow")
                    assert o.ok and o.result is not None, o.error
                    assert "is about an older migration: following this one with strategy none" in o.result.text()
                    [o] = await session.run_line("@src migrate --follow")
                    assert not o.ok and "this kvmshell follows this migration already" in (o.error or ""), o.error
                    [o] = await session.run_line("@src info migrate")
                    assert o.ok and o.result is not None and "not followed" not in o.result.text(), o.result
                    await g.side.migrate_cancel()
                    outcome = await session.migrations["src"].wait()
                    assert outcome.status == "cancelled", outcome
                finally:
                    await session.aclose()
        finally:
            await fleet.aclose()


async def test_postcopy_paused_is_shown_and_follow_exits_3(lab: Lab, tmp_path: Path) -> None:
    async with guests(lab, tmp_path, ws=WS) as g:
        fleet = await plain_migration(g, postcopy=True, bandwidth=4 << 20)
        try:
            await g.side.set_parameters({"max-postcopy-bandwidth": 1 << 20})
            await g.side.start_postcopy()
            await g.until(MigrationStatus.POSTCOPY_ACTIVE)
            await g.dst.wait_heartbeats(1)
            await g.side.migrate_pause()
            await g.until(MigrationStatus.POSTCOPY_PAUSED)
            badge = badge_for_info(await g.side.migration())[1]
            assert badge.startswith("migrating, postcopy-paused (not followed: `migrate --follow` to adopt)"), badge
            src = ("--guest", f"src={g.src.address}")
            rc, out, err = await kvmshell(tmp_path, *src, "-c", "@src info migrate")
            assert rc == 0 and "postcopy-paused and not followed: `migrate --follow` adopts it" in out, out
            rc, out, err = await kvmshell(tmp_path, *src, "-c", "@src migrate --follow")
            assert rc == 3, err
            assert "DANGER" in out and "migrate_recover" in out, out
            assert await g.status() is MigrationStatus.POSTCOPY_PAUSED
        finally:
            await fleet.aclose()


async def test_the_dashboard_shows_it_not_followed_and_adopts_it_from_the_command_bar(lab: Lab, tmp_path: Path) -> None:
    async with guests(lab, tmp_path, ws=WS) as g:
        fleet = await plain_migration(g)
        try:
            async with Fleet() as mine:
                source = await tui_attach(mine, tmp_path, g.src, current="src")
                r = tui_rig(source, [g.src])
                async with r.app.run_test(size=(160, 30), message_hook=r.messages.append) as pilot:
                    text = await tui_until(pilot, lambda: r.row("src").badge_text, "the badge")
                    assert "(not followed: `migrate --follow` to adopt)" in text, text
                    await pilot.press("slash", *"migrate --follow", "enter")
                    done = await tui_until(pilot, lambda: [m for m in r.finished("") if "migrate --follow" in m.line],
                                           "the command")
                    assert done[0].ok, r.output_text()
                    await tui_until(pilot, lambda: "not followed" not in r.row("src").badge_text, "followed")
                    await uncap(g)
                    await tui_until(pilot, lambda: r.row("src").badge is Badge.COMPLETED, "completed", timeout=60)
                await r.session.aclose()
            check = await check_guest_memory(fleet.monitor("dst"), WS, tmp_path)
            assert check.ok, check.problems
        finally:
            await fleet.aclose()


# -- the state file itself (no QEMU) -----------------------------------------------------------------

def test_state_file_round_trip_is_atomic_and_only_its_writer_removes_it(tmp_path: Path) -> None:
    state = running.RunningFile(source="vm1", source_address="qmp:unix:/run/vm1.qmp", strategy="auto", pid=os.getpid(),
                                dest="vm2", dest_address="qmp:unix:/run/vm2.qmp", uri="tcp:127.0.0.1:4444",
                                request={"bandwidth": 1 << 20}, stages=("copy storage",), started_at=12.5,
                                before={"source": {"capabilities": {"events": False},
                                                   "parameters": {"max-bandwidth": 5}}})
    running.write(state)
    assert running.load(state.source_address) == state
    assert [p.suffix for p in running.directory().iterdir()] == [".json"]        # no temporary file left
    running.remove(state.source_address, pid=os.getpid() + 1)                   # another kvmshell's: kept
    assert running.load(state.source_address) == state
    running.remove(state.source_address, pid=os.getpid())
    assert running.load(state.source_address) is None
    running.path_for("x").parent.mkdir(parents=True, exist_ok=True)
    running.path_for("x").write_text("{not json")
    assert running.load("x") is None                                             # logged, not raised


async def test_a_dead_or_zombie_kvmshell_is_not_alive() -> None:
    import subprocess
    child = subprocess.Popen(["true"])
    try:
        async def state() -> str:
            return Path(f"/proc/{child.pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        await wait_for(state, lambda st: st == "Z", what="a zombie (exited, not reaped: no wait() yet)")
        assert not running.pid_alive(child.pid)
    finally:
        child.wait()
    assert not running.pid_alive(child.pid)
    assert running.pid_alive(os.getpid())
    mine = running.RunningFile(source="a", source_address="a", strategy="auto", pid=os.getpid())
    assert not mine.alive                          # this very kvmshell is not "another live one"
