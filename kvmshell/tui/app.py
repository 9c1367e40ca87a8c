"""`kvmshell tui`: the dashboard over a Session.

The app is given a data source (``SessionSource`` live, ``ReplaySource`` from a trace). Polling runs
in workers; the fleet's events arrive as typed messages; views are frozen values that the widgets
diff against what they show. Commands - typed in the bar or built by the dialogs - go through the
source's ``run_line``, the same command language as the shell. Errors are notifications.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable

from rich.text import Text
from textual import on, work
from textual.app import App, ComposeResult, SystemCommand
from textual.containers import Horizontal, Vertical
from textual.css.query import NoMatches
from textual.screen import Screen
from textual.widgets import Footer, Static

from kvmshell.core.commands.results import Exit, Outcome, Watch
from kvmshell.core.values.models import Event
from kvmshell.core.commands.session import Session
from kvmshell.errors import KvmError
from kvmshell.tui.actions import ACTIONS, bindings
from kvmshell.tui.messages import CommandFinished, DirtyRateMeasured, GuestEvent, Polled, ProgressNote
from kvmshell.tui.screens import ConfirmScreen, HelpScreen, MigrateDialog, SnapshotDialog
from kvmshell.tui.source import DashboardSource, SessionSource
from kvmshell.tui.views import event_line, rate
from kvmshell.tui.commandbar import CommandBar, CompletionField
from kvmshell.tui.past import COMMANDS as PAST_COMMANDS, history_lines, past_pane
from kvmshell.core.migration.history import MigrationHistory
from kvmshell.tui.views import PaneView
from kvmshell.tui.widgets import EventLog, GuestList, MigrationPane, OutputLog

DARK, LIGHT = "textual-dark", "textual-light"
NOTIFY_EVENTS = {"kvmshell.MIGRATION_FINISHED", "kvmshell.DISCONNECTED"}
REFRESH_ON = {"STOP", "RESUME", "MIGRATION", "RESET", "SHUTDOWN", "kvmshell.CONNECTED", "kvmshell.MIGRATION_FINISHED"}


class Dashboard(Screen[None]):
    """The one main screen. Its bindings come from the actions table and call the app's actions."""

    BINDINGS = bindings()

    def __init__(self, source: DashboardSource, hint: str | None) -> None:
        super().__init__(id="dashboard")
        self.source = source
        self.hint = hint

    def compose(self) -> ComposeResult:
        hint = Static(self.hint or f"kvmshell: {len(self.source.names)} guests; / runs a command, ? helps",
                      id="hint", classes="-hint" if self.hint else "")
        yield hint
        yield GuestList(id="guests")
        with Horizontal(id="bottom"):
            yield MigrationPane(id="pane")
            with Vertical(id="logs"):
                yield EventLog(self.source.clock.hms, id="events")
                yield OutputLog(id="output")
        yield CommandBar(self.source.complete, self.source.history.entries, id="command-bar")
        yield Footer()

    def on_mount(self) -> None:
        app = self.app
        assert isinstance(app, KvmshellApp)
        app.start()


class KvmshellApp(App[int]):
    CSS_PATH = "app.tcss"
    TITLE = "kvmshell"
    HORIZONTAL_BREAKPOINTS = [(0, "-narrow"), (110, "-wide")]
    VERTICAL_BREAKPOINTS = [(0, "-short"), (34, "-tall")]

    def __init__(self, source: DashboardSource, hint: str | None = None, *, poll_interval: float = 1.0,
                 view_interval: float = 0.5, theme: str = DARK) -> None:
        super().__init__()
        self.source = source
        self.hint = hint
        self.poll_interval = poll_interval
        self.view_interval = view_interval
        self.selected: str | None = source.current
        self.dashboard = Dashboard(source, hint)
        self._polling = False
        self._stale = True
        self._unsubscribe: object = None
        self.theme = theme
        self.past: PaneView | None = None         # a past migration shown in the pane (`replay ID`)

    def get_default_screen(self) -> Screen[None]:
        return self.dashboard

    # -- the widgets (always the dashboard's, even under a dialog) -------------------------------
    @property
    def guest_list(self) -> GuestList:
        return self.dashboard.query_one(GuestList)

    @property
    def pane(self) -> MigrationPane:
        return self.dashboard.query_one(MigrationPane)

    @property
    def events_log(self) -> EventLog:
        return self.dashboard.query_one(EventLog)

    @property
    def output(self) -> OutputLog:
        return self.dashboard.query_one(OutputLog)

    @property
    def command_bar(self) -> CommandBar:
        return self.dashboard.query_one(CommandBar)

    # -- life cycle -------------------------------------------------------------------------------
    def start(self) -> None:
        """Once the dashboard is up: events in, the UI hooks into the session, the timers."""
        self._unsubscribe = self.source.subscribe(self._fleet_event)
        self.source.attach_ui(self.confirm, self._progress, self.edit)
        for ev in self.source.recent_events():
            line = event_line(ev)
            if line is not None:
                self.events_log.add(line)
        self.guest_list.selected = self.selected
        self.refresh_views()
        self.guest_list.table.focus()
        self.set_interval(self.poll_interval, self._poll_tick)
        self.set_interval(self.view_interval, self._view_tick)
        self._poll_tick()

    def on_unmount(self) -> None:
        if callable(self._unsubscribe):
            self._unsubscribe()
        self.source.attach_ui(None, None)

    # -- polling and views ------------------------------------------------------------------------
    def _poll_tick(self) -> None:
        if not self._polling:
            self._polling = True
            self.poll()

    @work(group="poll")
    async def poll(self) -> None:
        try:
            await self.source.poll()
        finally:
            self._polling = False
        self.post_message(Polled())

    def on_polled(self, _: Polled) -> None:
        self._stale = True

    def _view_tick(self) -> None:
        if self._stale or self.source.running():
            try:
                self.refresh_views()
            except NoMatches:           # only while the app closes: its widgets go before its timers
                pass

    def refresh_views(self) -> None:
        """Read the source's views (no I/O) and let the widgets redraw what changed."""
        self._stale = False
        gl = self.guest_list
        gl.show(self.source.rows())
        if self.selected is None and gl.order:
            self.selected = gl.order[0]
            self.source.current = self.selected
        self.pane.show(self.past or self.source.pane(self.selected))

    @on(GuestList.Selected)
    def _selected(self, event: GuestList.Selected) -> None:
        if event.name is None or event.name == self.selected:
            return
        self.selected = event.name
        self.source.current = event.name
        self.past = None
        if self.events_log.only is not None:
            self.events_log.set_scope(event.name)
        if self.command_bar.has_class("-open"):
            self.command_bar.border_title = f"{event.name}>"
        self.refresh_views()

    def select(self, name: str) -> None:
        """Select ``name`` in the list (as a click would)."""
        self.guest_list.select(name)
        if name != self.selected:
            self.selected = name
            self.source.current = name
            self.refresh_views()

    # -- events -----------------------------------------------------------------------------------
    def _fleet_event(self, ev: Event) -> None:
        self.post_message(GuestEvent(ev))

    def on_guest_event(self, message: GuestEvent) -> None:
        try:
            self._guest_event(message.event)
        except NoMatches:               # only while the app closes: its widgets go before its subscription
            pass

    def _guest_event(self, ev: Event) -> None:
        line = event_line(ev)
        if line is not None:
            self.events_log.add(line)
        if ev.name in REFRESH_ON:
            self.source.refresh_soon(ev.guest)
        self._stale = True
        if ev.name in NOTIFY_EVENTS or ev.name == "kvmshell.UNREACHABLE" and ev.guest == self.selected:
            ok = ev.name == "kvmshell.MIGRATION_FINISHED" and ev.data.get("status") == "completed"
            self.notify(line.text if line else ev.name, title=ev.guest, severity="information" if ok else "warning")
        if ev.name in ("kvmshell.MIGRATION_FINISHED", "kvmshell.DISCONNECTED", "kvmshell.UNREACHABLE",
                       "kvmshell.CONNECTED"):
            self.refresh_views()

    # -- commands ---------------------------------------------------------------------------------
    @work(group="commands")
    async def run_command(self, line: str) -> None:
        """Run one line of the command language; the outcome arrives as a CommandFinished message."""
        self.output.write(Text(f"{self.source.current or 'kvmshell'}> {line}", style="bold"))
        outcomes = await self.source.run_line(line)
        self.post_message(CommandFinished(line, outcomes))

    def on_command_finished(self, message: CommandFinished) -> None:
        grouped = len(message.outcomes) > 1
        out = self.output
        for o in message.outcomes:
            if grouped and o.guest:
                out.write(Text(f"── {o.guest} ──", style="bold"))
            if not o.ok:
                where = f"{o.guest}: " if o.guest and not grouped else ""
                out.write(Text(f"error: {o.error_title}: {where}{o.error}", style="bold red"))
                self.notify(o.error or "", title=f"{o.error_title}" + (f" ({o.guest})" if o.guest else ""),
                            severity="error", timeout=8)
                continue
            if isinstance(o.result, Exit):
                self.action_quit()
                continue
            if isinstance(o.result, Watch):
                out.write(Text("the migration pane shows this live (the dashboard is a permanent watch)",
                               style="italic"))
                continue
            self._write_result(o)
        if self.source.current != self.selected and self.source.current is not None:
            self.select(self.source.current)
        self._stale = True
        self.refresh_views()

    def _write_result(self, o: Outcome) -> None:
        assert o.result is not None
        for text in o.result.text().splitlines():
            self.output.write(Text(text, style="yellow" if text.startswith("warning: ") else ""))

    def on_progress_note(self, message: ProgressNote) -> None:
        self.output.write(Text(f"  {message.guest}: {message.text}" if message.guest else f"  {message.text}",
                               style="dim"))

    def _progress(self, guest: str, text: str) -> None:
        self.post_message(ProgressNote(guest, text))

    async def edit(self, text: str) -> str:
        """The session's editor: the dashboard steps aside while $EDITOR runs."""
        from kvmshell.core.commands.editor import edit_text
        with self.suspend():
            return await asyncio.to_thread(edit_text, text)

    async def confirm(self, question: str) -> bool:
        """The session's confirmer: a modal yes/no."""
        answer: asyncio.Future[bool] = asyncio.get_running_loop().create_future()

        def done(result: bool | None) -> None:
            if not answer.done():
                answer.set_result(bool(result))

        self.push_screen(ConfirmScreen(question), callback=done)
        return await answer

    # -- actions (one definition each: see actions.py) ---------------------------------------------
    def _target(self, *, reachable: bool = True) -> str | None:
        name = self.selected
        if name is None:
            self.notify("no guest selected", severity="warning")
            return None
        row = next((r for r in self.source.rows() if r.name == name), None)
        if reachable and row is not None and not row.reachable:
            self.notify(f"{name} is unreachable: {row.reason or 'no monitor'}", severity="error")
            return None
        return name

    def _default_dest(self, guest: str) -> str:
        for r in self.source.rows():
            if r.name != guest and r.reachable and "inmigrate" in r.state:
                return r.name
        return ""

    def _run_confirmed_line(self, line: str | None) -> None:
        if line:
            self.run_command(line)

    def action_migrate(self) -> None:
        guest = self._target()
        if guest is None:
            return
        if self.source.migrating(guest):
            self.notify(f"{guest} is already migrating; c cancels it", severity="warning")
            return
        self.push_screen(MigrateDialog(self.source, guest, self._default_dest(guest)), callback=self._run_confirmed_line)

    def action_cancel_migration(self) -> None:
        guest = self._target()
        if guest is None:
            return
        if not self.source.migrating(guest):
            self.notify(f"no migration of {guest} is running", severity="warning")
            return
        line = f"@{guest} migrate_cancel"
        self.push_screen(ConfirmScreen(f"Cancel the migration of {guest}? The guest keeps running here.",
                                       yes="Cancel it", no="Keep migrating"),
                         callback=lambda ok: self._run_confirmed_line(line if ok else None))

    def action_savevm(self) -> None:
        guest = self._target()
        if guest is not None:
            self.push_screen(SnapshotDialog(self.source, guest, "savevm"), callback=self._run_confirmed_line)

    def action_loadvm(self) -> None:
        guest = self._target()
        if guest is not None:
            self.push_screen(SnapshotDialog(self.source, guest, "loadvm"), callback=self._run_confirmed_line)

    def action_command_bar(self) -> None:
        self.command_bar.open(self.selected)

    @on(CommandBar.Run)
    def _bar_run(self, message: CommandBar.Run) -> None:
        self.source.history.append(message.line)
        words = message.line.split()
        if words[0] in PAST_COMMANDS:
            self.show_past(words[0], words[1] if len(words) > 1 else None)
        else:
            self.run_command(message.line)

    def show_past(self, command: str, ident: str | None) -> None:
        """`history` lists the past migrations in the output; `replay [ID]` shows one in the pane
        (until another guest is selected)."""
        history = MigrationHistory.default()
        self.output.write(Text(f"kvmshell> {command}" + (f" {ident}" if ident else ""), style="bold"))
        if command == "history":
            for text in history_lines(history):
                self.output.write(Text(text))
            return
        try:
            self.past = past_pane(history, ident)
        except KvmError as e:
            self.notify(e.message, title="replay", severity="error")
            return
        self.refresh_views()

    @on(CompletionField.Escaped, "#command-bar")
    def _bar_escaped(self) -> None:
        self.command_bar.close()
        self.guest_list.table.focus()

    def action_dirty_rate(self) -> None:
        guest = self._target()
        if guest is None:
            return
        if self.source.migrating(guest):
            self.notify("the migration pane shows the dirty rate while it migrates", severity="warning")
            return
        self.notify(f"measuring how fast {guest} dirties memory (1 s)...", timeout=3)
        self.measure_dirty_rate(guest)

    @work(group="dirty-rate", exclusive=True)
    async def measure_dirty_rate(self, guest: str) -> None:
        try:
            value = await self.source.measure_dirty_rate(guest)
        except KvmError as e:
            self.post_message(DirtyRateMeasured(guest, None, str(e)))
            return
        self.post_message(DirtyRateMeasured(guest, value))

    def on_dirty_rate_measured(self, message: DirtyRateMeasured) -> None:
        if message.error is not None:
            self.notify(message.error, title="dirty rate", severity="error")
        else:
            self.notify(f"{message.guest} dirties {rate(message.bytes_per_s)}", title="dirty rate")
        self._stale = True
        self.refresh_views()

    def action_filter(self) -> None:
        self.guest_list.begin_filtering()

    def action_sort(self) -> None:
        self.guest_list.cycle_sort()

    def action_events_scope(self) -> None:
        log = self.events_log
        log.set_scope(None if log.only is not None else self.selected)

    def action_toggle_theme(self) -> None:
        self.theme = LIGHT if self.theme == DARK else DARK

    def action_help(self) -> None:
        self.push_screen(HelpScreen())

    def action_quit(self) -> None:
        running = self.source.running()
        if not running:
            self.exit(0)
            return
        which = ", ".join(running)
        self.push_screen(ConfirmScreen(f"A migration is running ({which}). Quit anyway? kvmshell stops following "
                                       "it; QEMU carries on with it.", yes="Quit", no="Stay"),
                         callback=lambda ok: self.exit(0) if ok else None)

    def get_system_commands(self, screen: Screen[object]) -> Iterable[SystemCommand]:
        for cmd in super().get_system_commands(screen):
            if cmd.title != "Quit":
                yield cmd
        if screen is self.dashboard:
            for a in ACTIONS:
                yield SystemCommand(a.title, a.help, getattr(self, f"action_{a.name}"))


async def run_tui(session: Session, hint: str | None = None) -> int:
    """Run the dashboard over ``session`` until the user quits; the exit status."""
    app = KvmshellApp(SessionSource(session), hint=hint)
    result = await app.run_async()
    return int(result or 0)
