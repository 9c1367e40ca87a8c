"""The dashboard, driven by textual's Pilot: against real QEMU guests, and from recorded traces for the
pictures (regenerate those with `KVMSHELL_UPDATE_SNAPSHOTS=1 pytest tests/test_tui.py -k snapshot`)."""

from __future__ import annotations

import io
import os
import signal
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console
from textual.message import Message
from textual.pilot import Pilot
from textual.widgets import Button, DataTable, Input

from kvmshell.core.commands.registry import default_registry
from kvmshell.core.monitor.fleet import Fleet
from kvmshell.core.migration.model.samples import load_trace
from kvmshell.core.commands.session import Session
from kvmshell.lab.launcher import Lab, LabGuest, MonitorKind
from kvmshell.tui.actions import ACTIONS
from kvmshell.tui.app import LIGHT, KvmshellApp
from kvmshell.tui.history import History, format_entry, parse_history
from kvmshell.tui.messages import CommandFinished
from kvmshell.tui.replay import ReplaySource, StaticGuest
from kvmshell.tui.screens import ConfirmScreen, HelpScreen, MigrateDialog, SnapshotDialog
from kvmshell.tui.source import SessionSource
from kvmshell.tui.views import Badge
from kvmshell.tui.commandbar import CommandBar
from tests.waiting import wait_for

DATA = Path(__file__).parent / "data"
SNAPSHOTS = DATA / "tui"
UPDATE = os.environ.get("KVMSHELL_UPDATE_SNAPSHOTS") == "1"
WS = 4096                  # 16 MiB working set: a migration capped at 2 MB/s lasts seconds


# -- helpers ------------------------------------------------------------------------------------

def screen_text(app: KvmshellApp) -> str:
    """The screen as plain text, exactly as the terminal would show it."""
    width, height = app.size
    console = Console(width=width, height=height, file=io.StringIO(), force_terminal=True, color_system=None,
                      record=True, legacy_windows=False, safe_box=False)
    console.print(app.screen._compositor.render_update(full=True, screen_stack=app._background_screens,
                                                       simplify=True))
    return console.export_text()


async def settled_text(pilot: Pilot[Any], app: KvmshellApp) -> str:
    """The screen once two frames in a row are the same (everything deferred has been drawn)."""
    previous = None

    async def probe() -> tuple[str, str | None]:
        nonlocal previous
        await pilot.pause()
        text, before = screen_text(app), previous
        previous = text
        return text, before
    text, _ = await wait_for(probe, lambda tb: tb[0] == tb[1], timeout=10, what="a settled screen")
    return text


async def until(pilot: Pilot[Any], condition: Callable[[], Any], what: str, timeout: float = 30) -> Any:
    """Let the app run until ``condition()`` is true (processing its messages between checks)."""
    async def probe() -> Any:
        await pilot.pause()
        return condition()
    return await wait_for(probe, bool, timeout=timeout, what=what)


@dataclass
class Rig:
    app: KvmshellApp
    session: Session
    guests: dict[str, LabGuest]
    messages: list[Message] = field(default_factory=list)

    def row(self, name: str) -> Any:
        return next(r for r in self.app.source.rows() if r.name == name)

    def finished(self, prefix: str) -> list[CommandFinished]:
        return [m for m in self.messages if isinstance(m, CommandFinished) and m.line.startswith(prefix)]

    def output_text(self) -> str:
        return "\n".join(strip.text for strip in self.app.output.lines)

    def events_text(self) -> str:
        return "\n".join(strip.text for strip in self.app.events_log.lines)


@pytest.fixture
async def fleet() -> AsyncIterator[Fleet]:
    async with Fleet() as f:
        yield f


async def attach(fleet: Fleet, tmp_path: Path, *guests: LabGuest, current: str | None = None) -> SessionSource:
    for g in guests:
        fleet.add(g.name, g.address)
    await fleet.start()
    session = Session(fleet, default_registry(), current=current)
    await session.data.refresh_all()
    return SessionSource(session, history=History.load(tmp_path / "history"))


def rig(source: SessionSource, guests: list[LabGuest], **kw: Any) -> Rig:
    app = KvmshellApp(source, **kw)
    return Rig(app, source.session, {g.name: g for g in guests})


# -- pictures from recorded traces (deterministic) ----------------------------------------------

OTHERS = (StaticGuest("idle1"), StaticGuest("idle2", kind="hmp"),
          StaticGuest("gone", reason="no such socket (is the guest running, and the path right?)"))


def replay(name: str, at: float) -> ReplaySource:
    return ReplaySource(load_trace(DATA / "traces" / name), at, others=OTHERS)


@pytest.mark.parametrize(("trace", "at", "size", "picture"), [
    ("1gbit-150-auto.jsonl", 6.0, (100, 34), "mid-migration-100x34"),
    ("1gbit-150-defaults.jsonl", 30.0, (80, 24), "will-not-converge-80x24"),
    ("1gbit-110-auto.jsonl", 8.0, (120, 36), "completed-120x36"),
])
async def test_snapshot_layout_from_a_recorded_trace(trace: str, at: float, size: tuple[int, int],
                                                     picture: str) -> None:
    """The dashboard fed from a real trace at a fixed instant and clock: the guest list (an unreachable
    guest greyed with its reason, badges), the migration pane (figures, verdict, progress, sparklines,
    decisions) and the events log must look exactly like the committed picture."""
    app = KvmshellApp(replay(trace, at), hint="recorded trace: " + trace)
    async with app.run_test(size=size) as pilot:
        text = await settled_text(pilot, app)
        expected = SNAPSHOTS / f"{picture}.txt"
        if UPDATE:
            SNAPSHOTS.mkdir(parents=True, exist_ok=True)
            expected.write_text(text)
            app.save_screenshot(f"{picture}.svg", str(SNAPSHOTS))
        assert text == expected.read_text(), f"the screen differs from {expected} (KVMSHELL_UPDATE_SNAPSHOTS=1 " \
                                             "regenerates it; look at the .svg next to it)"
    if "will-not-converge" in picture:
        assert "WILL NOT CONVERGE" in text and "will-not-converge" in text
    if "completed" in picture:
        assert "COMPLETED" in text and "completed in" in text


async def test_resize_theme_palette_and_quit_from_a_recording() -> None:
    """Resizes from 80x24 up without losing the figures; the light theme; the palette offers every
    action; q asks while a migration runs."""
    app = KvmshellApp(replay("1gbit-150-auto.jsonl", 6.0))
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.pause()
        assert "remaining" in screen_text(app)
        await pilot.resize_terminal(160, 50)
        await pilot.pause()
        assert "dirty rate" in screen_text(app) and "throughput" in screen_text(app)
        await pilot.press("t")
        assert app.theme == LIGHT
        titles = {c.title for c in app.get_system_commands(app.dashboard)}
        assert {a.title for a in ACTIONS} <= titles
        await pilot.press("ctrl+p")
        await pilot.press(*"Help")
        await pilot.press("enter")
        await until(pilot, lambda: isinstance(app.screen, HelpScreen), "the help screen from the palette")
        await pilot.press("escape")
        await pilot.press("q")
        await until(pilot, lambda: isinstance(app.screen, ConfirmScreen), "quit asks while migrating")
        await pilot.press("n")
        await until(pilot, lambda: app.screen is app.dashboard, "back on the dashboard")
        assert app.is_running
        await pilot.press("q", "y")
    assert app.return_value == 0


async def test_filter_by_typing_and_sort_by_header_click() -> None:
    app = KvmshellApp(replay("1gbit-150-auto.jsonl", 6.0))
    async with app.run_test(size=(100, 30)) as pilot:
        gl = app.guest_list
        assert gl.order == ["dst", "gone", "idle1", "idle2", "src"]
        await pilot.press("f", *"idle")
        assert gl.order == ["idle1", "idle2"]
        await pilot.press("enter")                       # keeps the filter, back to the list
        assert gl.filter_text == "idle" and app.focused is gl.table
        await pilot.press("escape")                      # clears it
        assert len(gl.order) == 5
        await pilot.click("#guest-table", offset=(60, 0))     # the MIGRATION header
        await pilot.pause()
        assert gl.sort_key.value == "migration" and gl.order[0] == "src"    # will-not-converge first
        await pilot.press("o")
        assert gl.sort_key.value == "name"
        assert app.selected == "idle1"                   # the filter moved the selection to its first match
        await pilot.press("up")
        await until(pilot, lambda: app.selected == "gone", "the selection follows the cursor")
        assert app.pane.view is not None and "unreachable" in app.pane.view.headline


# -- against real guests ------------------------------------------------------------------------

@pytest.mark.qemu
async def test_migrate_from_the_dialog_reaches_completed(lab: Lab, fleet: Fleet, tmp_path: Path) -> None:
    src = await lab.start("src", MonitorKind.QMP_UNIX, ws_pages=256, ram_mib=64, wait_banner=False)
    dst = await lab.start("dst", MonitorKind.HMP_UNIX, ws_pages=256, ram_mib=64, incoming=True, disk=src.disk)
    source = await attach(fleet, tmp_path, src, dst, current="src")
    r = rig(source, [src, dst])
    # 24 rows: the prediction scrolls, the buttons stay in view (a long one pushed Migrate off at 40 rows)
    async with r.app.run_test(size=(120, 24), message_hook=r.messages.append) as pilot:
        await pilot.press("m")
        dialog = await until(pilot, lambda: isinstance(r.app.screen, MigrateDialog) and r.app.screen, "the dialog")
        assert dialog.query_one("#dest", Input).value == "dst"          # the guest waiting with -incoming
        await until(pilot, lambda: not dialog.query_one("#ok", Button).disabled, "the prediction", timeout=30)
        assert "auto would run" in dialog.estimate_text and "destination: dst" in dialog.estimate_text
        await pilot.click("#ok")
        await until(pilot, lambda: r.finished("@src migrate --to dst"), "the migrate command")
        [done] = r.finished("@src migrate --to dst")
        assert done.ok and done.line == "@src migrate --to dst --strategy auto --downtime 300", done.line
        pane = r.app.pane
        await until(pilot, lambda: pane.view and pane.view.migration and pane.view.migration.status == "completed",
                    "the pane reaches completed", timeout=60)
        assert r.row("src").badge is Badge.COMPLETED
        assert pane.view.migration.outcome_ok and "completed in" in (pane.view.migration.outcome or "")
        assert "migration completed" in r.events_text()


@pytest.mark.qemu
async def test_cancel_from_the_keyboard(lab: Lab, fleet: Fleet, tmp_path: Path) -> None:
    src = await lab.start("src", MonitorKind.QMP_UNIX, ws_pages=WS, pace=2, ram_mib=64)
    dst = await lab.start("dst", MonitorKind.QMP_UNIX, ws_pages=WS, ram_mib=64, incoming=True, disk=src.disk)
    source = await attach(fleet, tmp_path, src, dst, current="src")
    r = rig(source, [src, dst])
    async with r.app.run_test(size=(100, 30), message_hook=r.messages.append) as pilot:
        await pilot.press("slash", *"migrate --to dst --bandwidth 2M", "enter")
        await until(pilot, lambda: r.row("src").badge in (Badge.ACTIVE, Badge.WONT_CONVERGE), "migrating")
        await pilot.press("escape", "c")
        await until(pilot, lambda: isinstance(r.app.screen, ConfirmScreen), "the confirmation")
        await pilot.press("y")
        await until(pilot, lambda: r.row("src").badge is Badge.CANCELLED, "cancelled", timeout=30)
        assert r.finished("@src migrate_cancel")[0].ok
        assert r.row("src").state == "running"
        assert "migration cancelled" in r.events_text()


@pytest.mark.qemu
async def test_savevm_and_loadvm_through_the_dialogs(lab: Lab, fleet: Fleet, tmp_path: Path) -> None:
    vm = await lab.start("vm", MonitorKind.QMP_UNIX, ws_pages=256, ram_mib=48, wait_banner=False)
    source = await attach(fleet, tmp_path, vm, current="vm")
    r = rig(source, [vm])
    async with r.app.run_test(size=(100, 30), message_hook=r.messages.append) as pilot:
        await pilot.press("s")
        await until(pilot, lambda: isinstance(r.app.screen, SnapshotDialog), "the savevm dialog")
        await pilot.press(*"before", "enter")
        await until(pilot, lambda: r.finished("@vm savevm before"), "savevm", timeout=60)
        assert r.finished("@vm savevm before")[0].ok, r.output_text()
        assert "saved snapshot 'before'" in r.output_text()
        await until(pilot, lambda: [t.tag for t in source.tags("vm")] == ["before"], "the tag in the cache")
        await pilot.press("l")
        dialog = await until(pilot, lambda: isinstance(r.app.screen, SnapshotDialog) and r.app.screen,
                             "the loadvm dialog")
        await pilot.press("b", "tab")                       # completes the tag from the guest's snapshots
        assert dialog.query_one("#tag", Input).value == "before"
        await pilot.press("enter")
        await until(pilot, lambda: isinstance(r.app.screen, ConfirmScreen), "loadvm asks over a running guest")
        assert "replaces the running guest" in r.app.screen.question
        await pilot.press("y")
        await until(pilot, lambda: r.finished("@vm loadvm before"), "loadvm", timeout=60)
        assert r.finished("@vm loadvm before")[0].ok
        assert "loaded snapshot 'before'" in r.output_text()


@pytest.mark.qemu
async def test_command_bar_completes_and_shares_the_history(lab: Lab, fleet: Fleet, tmp_path: Path) -> None:
    vm = await lab.start("vm", MonitorKind.HMP_UNIX, paused=True)
    (tmp_path / "history").write_text(format_entry("info migrate_parameters"))   # as `kvmshell shell` left it
    source = await attach(fleet, tmp_path, vm, current="vm")
    r = rig(source, [vm])
    async with r.app.run_test(size=(100, 30), message_hook=r.messages.append) as pilot:
        await pilot.press("colon", *"loa")
        bar = r.app.query_one(CommandBar)
        await until(pilot, lambda: bar.showing, "suggestions as you type")
        assert bar.candidates[0].text == "loadvm"
        await pilot.press("tab")
        assert bar.value == "loadvm"
        bar.value = ""
        await pilot.press(*"info st")
        await until(pilot, lambda: [c.text for c in bar.candidates] == ["status"], "info subcommands")
        await pilot.press("tab", "enter")
        await until(pilot, lambda: r.finished("info status"), "info status")
        assert "VM status: paused" in r.output_text()
        await pilot.press("up", "up")                           # back through this session, then the shell's
        assert bar.value == "info migrate_parameters"
        assert parse_history((tmp_path / "history").read_text()) == ["info migrate_parameters", "info status"]


@pytest.mark.qemu
async def test_dirty_rate_on_demand(lab: Lab, fleet: Fleet, tmp_path: Path) -> None:
    vm = await lab.start("vm", MonitorKind.QMP_UNIX, paused=True)
    source = await attach(fleet, tmp_path, vm, current="vm")
    r = rig(source, [vm])
    async with r.app.run_test(size=(100, 30)) as pilot:
        await until(pilot, lambda: r.app.pane.view and "not measured" in r.app.pane.view.dirty_rate, "the offer")
        await pilot.press("d")
        await until(pilot, lambda: "measured" in r.app.pane.view.dirty_rate and "not measured" not in
                    r.app.pane.view.dirty_rate, "the measurement", timeout=20)
        assert "MB/s" in r.app.pane.view.dirty_rate


@pytest.mark.qemu
async def test_a_guest_killed_while_shown_is_greyed_with_the_reason(lab: Lab, fleet: Fleet, tmp_path: Path) -> None:
    a = await lab.start("a", MonitorKind.QMP_UNIX, paused=True)
    b = await lab.start("b", MonitorKind.HMP_UNIX, paused=True)
    source = await attach(fleet, tmp_path, a, b, current="b")
    r = rig(source, [a, b])
    async with r.app.run_test(size=(100, 30), message_hook=r.messages.append) as pilot:
        await until(pilot, lambda: r.row("b").state.startswith("paused"), "b shown")
        os.kill(b.pid, signal.SIGKILL)
        await until(pilot, lambda: not r.row("b").reachable, "b greyed")
        assert r.row("b").reason
        await until(pilot, lambda: r.app.pane.view and "unreachable" in r.app.pane.view.headline, "the reason")
        table = r.app.guest_list.query_one(DataTable)
        cell = table.get_cell("b", "state")
        assert "dim" in str(cell.style) and r.row("b").reason[:8] in cell.plain
        assert table.get_cell("b", "migration").plain == "unreachable"
        await pilot.press("m")                                # refused with a notification, no dialog
        await pilot.pause()
        assert r.app.screen is r.app.dashboard
        assert r.row("a").reachable and r.app.is_running
        assert "monitor lost" in r.events_text() or "unreachable" in r.events_text()
