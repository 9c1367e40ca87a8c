"""Modal screens: confirmations, help, and the migrate / savevm / loadvm dialogs.

A dialog never runs anything itself except the model's estimate: it returns the command line the
user confirmed, and the app runs it through the source like any command typed in the bar.
"""

from __future__ import annotations

import time
from datetime import datetime

from rich.table import Table
from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Grid, Horizontal, Vertical, VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Button, Checkbox, Input, Label, Select, Static

from kvmshell.core.commands.migrate_request import MigrateRequest
from kvmshell.core.migration.live.strategies import summaries
from kvmshell.core.values.units import human_bytes, parse_positive_int, parse_rate
from kvmshell.tui.actions import ACTIONS, key_text
from kvmshell.tui.source import DashboardSource
from kvmshell.tui.commandbar import CompletionField

STRATEGIES = tuple((f"{name}: {summary}", name) for name, summary in summaries())


class ConfirmScreen(ModalScreen[bool]):
    """A yes/no question; y/Enter on Yes, n/Escape for no."""

    BINDINGS = [Binding("y", "answer(True)", "Yes"), Binding("n,escape", "answer(False)", "No")]

    def __init__(self, question: str, yes: str = "Yes", no: str = "No") -> None:
        super().__init__(classes="dialog-screen")
        self.question = question
        self.yes, self.no = yes, no

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog", id="confirm-dialog"):
            yield Static(self.question, id="question")
            with Horizontal(classes="buttons"):
                yield Button(f"{self.yes} (y)", variant="warning", id="yes")
                yield Button(f"{self.no} (n)", id="no")

    def on_mount(self) -> None:
        self.query_one("#no", Button).focus()

    def action_answer(self, answer: bool) -> None:
        self.dismiss(answer)

    @on(Button.Pressed)
    def _pressed(self, event: Button.Pressed) -> None:
        self.dismiss(event.button.id == "yes")


class HelpScreen(ModalScreen[None]):
    BINDINGS = [Binding("escape,q,question_mark", "close", "Close")]

    def compose(self) -> ComposeResult:
        keys = Table.grid(padding=(0, 2))
        keys.add_column(style="bold", justify="right", no_wrap=True)
        keys.add_column()
        for a in ACTIONS:
            keys.add_row(key_text(a), a.help)
        keys.add_row("ctrl+p", "the command palette: every action above, by name")
        keys.add_row("tab", "in the command bar and the dialogs: complete")
        keys.add_row("mouse", "click a guest to select it, a column header to sort it, buttons in dialogs")
        with VerticalScroll(classes="dialog", id="help-dialog"):
            yield Static(Text("kvmshell dashboard", style="bold"))
            yield Static(keys, id="help-keys")
            yield Static(Text("The command bar takes every command of `kvmshell shell` (`help` lists them); a "
                              "command runs on the selected guest unless it starts with @NAME or @all.",
                              style="dim"))
            with Horizontal(classes="buttons"):
                yield Button("Close", id="close")

    def action_close(self) -> None:
        self.dismiss(None)

    @on(Button.Pressed)
    def _close(self) -> None:
        self.dismiss(None)


class SnapshotDialog(ModalScreen[str | None]):
    """savevm / loadvm: a tag with completion from the guest's snapshots; returns the command line."""

    BINDINGS = [Binding("escape", "cancel", "Cancel")]

    def __init__(self, source: DashboardSource, guest: str, mode: str) -> None:
        super().__init__(classes="dialog-screen")
        assert mode in ("savevm", "loadvm")
        self.source, self.guest, self.mode = source, guest, mode
        self._shown_tags: tuple[str, ...] | None = None

    def compose(self) -> ComposeResult:
        verb = "Save a snapshot of" if self.mode == "savevm" else "Load a snapshot into"
        with Vertical(classes="dialog", id=f"{self.mode}-dialog"):
            yield Label(Text.assemble((f"{verb} {self.guest}", "bold")))
            yield Label("tag" + (" (empty: vm-DATE)" if self.mode == "savevm" else "") + ":")
            yield CompletionField(self.source.complete, prefix=f"@{self.guest} {self.mode} ", input_id="tag",
                                  placeholder="snapshot tag (TAB completes)", compact=False)
            yield Static("", id="tags")
            yield Static("", id="dialog-error")
            with Horizontal(classes="buttons"):
                yield Button("Save" if self.mode == "savevm" else "Load", variant="primary", id="ok")
                yield Button("Cancel", id="cancel")

    def on_mount(self) -> None:
        self.source.want_tags(self.guest)
        self._show_tags()
        self.set_interval(0.5, self._show_tags)
        self.query_one("#tag", Input).focus()

    def _show_tags(self) -> None:
        tags = self.source.tags(self.guest)
        names = tuple(t.tag for t in tags)
        if names == self._shown_tags:
            return
        self._shown_tags = names
        if not tags:
            self.query_one("#tags", Static).update(Text("no snapshots on this guest yet", style="dim"))
            return
        text = Text("snapshots:\n", style="dim")
        for t in tags:
            text.append(f"  {t.tag}", style="bold")
            text.append(f"  {datetime.fromtimestamp(t.date_sec):%Y-%m-%d %H:%M}  {human_bytes(t.vm_state_size)}\n",
                        style="dim")
        self.query_one("#tags", Static).update(text)
        field = self.query_one(CompletionField)
        if field.input.has_focus:
            field.refresh_candidates()

    def _line(self) -> str | None:
        tag = self.query_one("#tag", Input).value.strip()
        error = self.query_one("#dialog-error", Static)
        if self.mode == "loadvm" and not tag:
            error.update(Text("give the tag of the snapshot to load", style="bold red"))
            return None
        if any(c.isspace() or c in "\"'" for c in tag):
            error.update(Text("a tag without spaces or quotes, please", style="bold red"))
            return None
        return f"@{self.guest} {self.mode}" + (f" {tag}" if tag else "")

    def action_cancel(self) -> None:
        self.dismiss(None)

    @on(Input.Submitted, "#tag")
    def _submitted(self, event: Input.Submitted) -> None:
        event.stop()
        self._ok()

    @on(Button.Pressed, "#ok")
    def _ok(self) -> None:
        line = self._line()
        if line is not None:
            self.dismiss(line)

    @on(Button.Pressed, "#cancel")
    def _cancel(self) -> None:
        self.dismiss(None)

    @on(CompletionField.Escaped)
    def _escaped(self) -> None:
        self.dismiss(None)


DISKS = [("shared storage (nothing to copy)", ""), ("copy whole disks over NBD", "all"),
         ("copy the top qcow2 layer over NBD", "inc")]


class MigrateDialog(ModalScreen[str | None]):
    """Destination (completed from the attached guests), strategy, limits, postcopy; the model's
    prediction (`migrate --to DEST --estimate`, ~4 s) is shown before Migrate can be pressed."""

    BINDINGS = [Binding("escape", "cancel", "Cancel")]

    def __init__(self, source: DashboardSource, guest: str, dest: str = "") -> None:
        super().__init__(classes="dialog-screen")
        self.source, self.guest, self.dest = source, guest, dest
        self.estimating = False
        self.estimate_text = ""
        self.estimated_for: str | None = None
        self._started = 0.0

    def compose(self) -> ComposeResult:
        d = self.source.defaults
        with VerticalScroll(classes="dialog", id="migrate-dialog"):
            yield Label(Text.assemble(("Migrate ", "bold"), (self.guest, "bold"),
                                      " to an attached guest waiting with -incoming defer"))
            with Grid(id="migrate-form"):
                yield Label("destination")
                yield CompletionField(self.source.complete, prefix=f"@{self.guest} migrate --to ", value=self.dest,
                                      input_id="dest", placeholder="guest name (TAB completes)")
                yield Label("strategy")
                yield Select([(label, value) for label, value in STRATEGIES], value=d.strategy, allow_blank=False,
                             id="strategy", compact=True)
                yield Label("bandwidth cap")
                yield Input(placeholder="uncapped (e.g. 1gbit, 500M)", id="bandwidth", compact=True)
                yield Label("downtime limit")
                yield Input(value=str(d.downtime_ms), placeholder="ms", id="downtime", compact=True)
                yield Label("link speed")
                yield Input(value=d.link or "", placeholder="for the model (e.g. 1gbit); optional", id="link",
                            compact=True)
                yield Label("postcopy")
                yield Checkbox("allow auto to switch to postcopy", value=d.allow_postcopy, id="postcopy")
                yield Label("disks")
                yield Select(DISKS, value="", allow_blank=False, id="disks", compact=True)
                yield Label("TLS")
                yield Input(placeholder="DIR from `kvmshell tls-init`; optional", id="tls",
                            compact=True)
            yield Static("", id="prediction")
            yield Static("", id="stale")
            yield Static("", id="dialog-error")
            with Horizontal(classes="buttons"):
                yield Button("Migrate", variant="primary", id="ok", disabled=True)
                yield Button("Estimate again", id="estimate")
                yield Button("Cancel", id="cancel")

    def on_mount(self) -> None:
        self.query_one("#dest", Input).focus()
        self.set_interval(0.5, self._tick)
        if self.dest:
            self.run_estimate()
        else:
            self.query_one("#prediction", Static).update(Text("pick a destination, then Estimate", style="dim"))

    # -- the form -----------------------------------------------------------------------------
    def _values(self) -> dict[str, str] | None:
        """The fields, checked with the command language's own parsers; None (and a message) if wrong."""
        get = lambda i: self.query_one(f"#{i}", Input).value.strip()  # noqa: E731
        vals = {"dest": get("dest"), "bandwidth": get("bandwidth"), "downtime": get("downtime"), "link": get("link"),
                "tls": get("tls")}
        error = self.query_one("#dialog-error", Static)
        try:
            if not vals["dest"]:
                raise ValueError("pick the destination guest")
            if vals["dest"] not in self.source.names:
                raise ValueError(f"{vals['dest']!r} is not an attached guest")
            if vals["dest"] == self.guest:
                raise ValueError("the destination is the guest being migrated")
            if vals["bandwidth"]:
                parse_rate(vals["bandwidth"])
            if vals["downtime"]:
                parse_positive_int(vals["downtime"], "the downtime limit")
            if vals["link"]:
                parse_rate(vals["link"])
        except ValueError as e:
            error.update(Text(str(e), style="bold red"))
            return None
        error.update("")
        return vals

    def request(self) -> MigrateRequest | None:
        """The form as the typed request `migrate --to` parses into; None (and a message) if wrong."""
        vals = self._values()
        if vals is None:
            return None
        rate = lambda key: parse_rate(vals[key]) if vals[key] else None  # noqa: E731
        return MigrateRequest(self.guest, dest=vals["dest"], strategy=str(self.query_one("#strategy", Select).value),
                              bandwidth=rate("bandwidth"), link=rate("link"),
                              downtime_ms=int(vals["downtime"]) if vals["downtime"] else None,
                              allow_postcopy=self.query_one("#postcopy", Checkbox).value,
                              copy_storage=str(self.query_one("#disks", Select).value) or None,
                              tls=vals["tls"] or None)

    def command_line(self) -> str | None:
        req = self.request()
        return req.line() if req is not None else None

    def estimate_line(self) -> str | None:
        req = self.request()
        if req is None:
            return None
        # the model runs at the link's speed; a bandwidth cap below it is what the migration will get
        link = min(r for r in (req.link, req.bandwidth, float("inf")) if r is not None)
        return MigrateRequest(self.guest, dest=req.dest, estimate=True, downtime_ms=req.downtime_ms,
                              link=None if link == float("inf") else int(link),
                              tls=req.tls).line()      # the estimate warns about plain TCP without TLS

    # -- the estimate -------------------------------------------------------------------------
    def _tick(self) -> None:
        if self.estimating:
            self.query_one("#prediction", Static).update(Text(
                f"the model's prediction: reading {self.guest}'s pages and measuring its dirty rate... "
                f"{time.monotonic() - self._started:.0f} s", style="italic"))

    @work(exclusive=True, group="estimate")
    async def run_estimate(self) -> None:
        line = self.estimate_line()
        if line is None:
            return
        self.estimating = True
        self._started = time.monotonic()
        self.query_one("#ok", Button).disabled = True
        self.query_one("#estimate", Button).disabled = True
        self._tick()
        try:
            outcomes = await self.source.run_line(line)
        finally:
            self.estimating = False
            self.query_one("#ok", Button).disabled = False
            self.query_one("#estimate", Button).disabled = False
        text = Text()
        for o in outcomes:
            if o.ok and o.result is not None:
                body = o.result.text()
                if "--link" in line and not self.query_one("#link", Input).value.strip():
                    body += "\n(the bandwidth cap stands for the link in this prediction)"
                text.append("the model's prediction\n", style="bold")
                text.append(body)
            else:
                text.append(f"no prediction: {o.error}", style="bold red")
        self.estimate_text = text.plain
        self.estimated_for = line
        self.query_one("#prediction", Static).update(text)
        self.query_one("#stale", Static).update("")

    @on(Input.Changed)
    @on(Select.Changed)
    @on(Checkbox.Changed)
    def _changed(self) -> None:
        """The prediction shown was made for other limits: say so."""
        if not self.estimate_text or self.estimating:
            return
        stale = self.estimate_line() not in (None, self.estimated_for)
        self.query_one("#stale", Static).update(
            Text("the limits changed since this prediction: Estimate again to see the new one", style="bold yellow")
            if stale else "")

    # -- buttons ------------------------------------------------------------------------------
    def action_cancel(self) -> None:
        self.dismiss(None)

    @on(CompletionField.Escaped)
    def _escaped(self) -> None:
        self.dismiss(None)

    @on(Button.Pressed, "#cancel")
    def _cancel(self) -> None:
        self.dismiss(None)

    @on(Button.Pressed, "#estimate")
    def _estimate(self) -> None:
        self.run_estimate()

    @on(Input.Submitted)
    def _enter(self, event: Input.Submitted) -> None:
        """Enter in a field: estimate first; once the prediction is shown, migrate."""
        event.stop()
        if self.estimating:
            return
        if not self.estimate_text:
            self.run_estimate()
        else:
            self._ok()

    @on(Button.Pressed, "#ok")
    def _ok(self) -> None:
        line = self.command_line()
        if line is not None:
            self.dismiss(line)
