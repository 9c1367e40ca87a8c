"""The migration commands and the faces during a libvirt migration, between two test hosts
(``two_hosts`` of tests/libvirtd.py: a private libvirtd in each network namespace).

`migrate_set_*` before a migration become libvirt's flags and typed parameters at its start, during
it libvirt's calls (migrateSetMaxSpeed, migrateSetMaxDowntime); what libvirt has no call for is refused
in one line. The TUI runs `migrate --to-host` while `info migrate`, `info migrate --watch`, `guests`,
completion and the pane show it; `migrate_cancel` (the TUI's cancel key) aborts libvirt's job.
The migration lasts: its speed is capped at 2 MiB/s (libvirt's own cap) over a 16 MiB working set.
"""

from __future__ import annotations

import asyncio
import io
from pathlib import Path
from typing import Any

import pytest
from textual.message import Message

from kvmshell.cli.lines import _watch_plain
from kvmshell.config import Config, HostConfig
from kvmshell.core.commands.completion import CompletionEngine
from kvmshell.core.commands.registry import default_registry
from kvmshell.core.commands.results import Outcome
from kvmshell.core.commands.session import Session
from kvmshell.core.monitor.fleet import Fleet
from kvmshell.core.values.address import Address, SshTarget
from kvmshell.tui.app import KvmshellApp
from kvmshell.tui.history import History
from kvmshell.tui.messages import CommandFinished
from kvmshell.tui.screens import ConfirmScreen
from kvmshell.tui.source import SessionSource
from kvmshell.tui.views import Badge
from tests.libvirtd import TwoHosts, needs_libvirt, needs_netns, state
from tests.test_tui import screen_text, until
from tests.waiting import wait_for

try:
    import libvirt
except ImportError:
    pass


async def one(session: Session, line: str) -> Outcome:
    [o] = await session.run_line(line)
    return o


async def ok(session: Session, line: str) -> str:
    o = await one(session, line)
    assert o.ok, f"{line}: {o.error}"
    return o.result.text() if o.result is not None else ""


async def refused(session: Session, line: str) -> str:
    o = await one(session, line)
    assert not o.ok and o.error and "\n" not in o.error, f"{line}: {o}"
    return o.error


@needs_libvirt
@needs_netns
@pytest.mark.qemu
async def test_commands_faces_and_cancel_during_a_libvirt_migration(two_hosts: TwoHosts, tmp_path: Path) -> None:
    h = two_hosts
    dom = await h.src.define("w1", ws_pages=4096)
    config = Config(hosts={"h2": HostConfig("h2", SshTarget(h.net.dst.ip, "root"), libvirt=h.dst.uri)})
    messages: list[Message] = []
    async with Fleet() as fleet:
        fleet.add("w1", Address.libvirt("w1", h.src.uri))
        await fleet.start()
        session = Session(fleet, default_registry(), config, current="w1")
        try:
            # before: what the next libvirt migration starts with; what libvirt cannot take is refused
            assert await ok(session, "migrate_set_capability auto-converge on") == "auto-converge on"
            await ok(session, "migrate_set_speed 2M")
            assert await ok(session, "migrate_set_downtime 0.4") == "downtime-limit = 400 ms"
            assert "auto-converge: on" in (await ok(session, "info migrate_capabilities")).replace("  ", " ")
            assert (await refused(session, "migrate_set_capability zero-blocks on")).startswith(
                "libvirt has no migration flag for the capability zero-blocks")
            assert (await refused(session, "migrate_set_parameter multifd-channels 4")).startswith(
                "libvirt has no call to set multifd-channels at the start of a migration")
            await session.data.refresh_all()
            source = SessionSource(session, history=History.load(tmp_path / "history"))
            app = KvmshellApp(source)

            def row() -> Any:
                return next(r for r in source.rows() if r.name == "w1")

            def finished(prefix: str) -> list[CommandFinished]:
                return [m for m in messages if isinstance(m, CommandFinished) and m.line.startswith(prefix)]

            async with app.run_test(size=(120, 30), message_hook=messages.append) as pilot:
                await pilot.press("slash", *f"migrate --to-host h2 --address {h.net.dst.ip} --unsafe --strategy precopy --bandwidth 2M",
                                  "enter")
                try:
                    await until(pilot, lambda: row().badge is Badge.ACTIVE, "the row shows the migration", timeout=60)
                except AssertionError:
                    raise AssertionError(f"{row()} {[(m.line, m.outcomes) for m in finished('')]} "
                                         f"{dom.jobStats()}") from None
                # libvirt took what was set before, at the start
                await wait_for(lambda: asyncio.to_thread(dom.migrateGetMaxDowntime, 0), lambda ms: ms == 400,
                               what="libvirt's max downtime from migrate_set_downtime")
                # during: libvirt's calls; the rest refused in one line, libvirt untouched
                await ok(session, "migrate_set_speed 3M")
                assert dom.migrateGetMaxSpeed(0) == 3
                assert await ok(session, "migrate_set_parameter max-bandwidth 2M") == "max-bandwidth = 2097152"
                assert dom.migrateGetMaxSpeed(0) == 2
                await ok(session, "migrate_set_downtime 0.6")
                assert dom.migrateGetMaxDowntime(0) == 600
                assert (await refused(session, "migrate_set_parameter xbzrle-cache-size 1M")).startswith(
                    "libvirt has no call to set xbzrle-cache-size during a migration")
                assert (await refused(session, "migrate_set_capability auto-converge on")).startswith(
                    "libvirt takes auto-converge only as a flag of the start of a migration")
                # the faces: info migrate, its watch, guests, completion, the pane
                text = await ok(session, "info migrate")
                assert "Migration status: active" in text and "transferred ram" in text, text
                assert "progress" in text and "model" in text, text
                watched = io.StringIO()
                stop = asyncio.Event()
                watch = asyncio.create_task(_watch_plain(session, "info migrate", 0.5, "w1", watched, stop))
                guests = await ok(session, "guests")
                assert "w1" in guests and "libvirt:" in guests, guests
                engine = CompletionEngine(session)
                assert "@w1" in [c.text for c in engine.complete("@")]
                assert [c.text for c in engine.complete("migrate_set_parameter max-b")] == ["max-bandwidth"]
                assert "migrate_cancel" in [c.text for c in engine.complete("migrate_c")]
                pane = app.pane
                await until(pilot, lambda: pane.view and pane.view.migration and
                            pane.view.migration.status == "active", "the pane shows it")
                assert "w1" in screen_text(app)
                # cancel from the TUI: libvirt's job is aborted, kvmshell's job ends cancelled
                await pilot.press("escape", "c")
                await until(pilot, lambda: isinstance(app.screen, ConfirmScreen), "the confirmation")
                await pilot.press("y")
                await until(pilot, lambda: finished("@w1 migrate_cancel"), "migrate_cancel")
                assert finished("@w1 migrate_cancel")[0].ok
                await until(pilot, lambda: finished("migrate --to-host"), "the migrate command ends", timeout=60)
                [done] = finished("migrate --to-host")
                [o] = done.outcomes
                assert not o.ok and o.error and "migration through libvirt cancelled" in o.error, o.error
                assert f"libvirt has w1: source {h.src.uri}: running, persistent; destination {h.dst.uri}: " \
                       "no such domain" in o.error, o.error
                await until(pilot, lambda: row().badge is Badge.CANCELLED, "the row says cancelled")
                async with asyncio.timeout(30):
                    await watch
                assert "Migration status: active" in watched.getvalue(), watched.getvalue()
                assert watched.getvalue().rstrip().count("--- ") >= 2
        finally:
            await session.aclose()
    # libvirt's view: the source runs on, persistent; nothing on the destination
    assert state(h.src, "w1") == (libvirt.VIR_DOMAIN_RUNNING, True)
    await wait_for(lambda: asyncio.to_thread(state, h.dst, "w1"), lambda s: s is None, timeout=30,
                   what="the destination's domain gone")
