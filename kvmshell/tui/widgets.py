"""The dashboard's widgets. Each is given frozen views and redraws only the parts that changed."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence

from rich.table import Table
from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.message import Message
from textual.reactive import reactive
from textual.widgets import DataTable, Input, ProgressBar, RichLog, Sparkline, Static
from textual.widgets.data_table import ColumnKey

from kvmshell.tui.views import Badge, Figures, GuestRow, LogLine, MigrationView, PaneView, SortKey, sort_rows

# -- colours that follow the theme ----------------------------------------------------------------


def theme_colors(widget: object) -> dict[str, str]:
    app = getattr(widget, "app")
    theme = app.current_theme
    return {"good": theme.success or "green", "bad": theme.error or "red", "warn": theme.warning or "yellow",
            "accent": theme.accent or theme.primary, "muted": "dim"}


# -- the guest list -------------------------------------------------------------------------------

COLUMNS: tuple[tuple[str, str, SortKey], ...] = (
    ("name", "NAME", SortKey.NAME), ("host", "HOST", SortKey.HOST), ("state", "STATE", SortKey.STATE),
    ("ram", "RAM", SortKey.RAM), ("kind", "MON", SortKey.KIND), ("migration", "MIGRATION", SortKey.MIGRATION),
)
STATE_WIDTH = 22


class GuestTable(DataTable[Text]):
    BINDINGS = [Binding("escape", "clear_filter", "Clear filter", show=False)]

    def action_clear_filter(self) -> None:
        self.parent_list().set_filter("")

    def parent_list(self) -> GuestList:
        node = self.parent
        assert isinstance(node, GuestList)
        return node


class FilterInput(Input):
    BINDINGS = [Binding("escape", "done(True)", show=False), Binding("enter", "done(False)", show=False),
                Binding("down", "done(False)", show=False)]

    def action_done(self, clear: bool) -> None:
        owner = self.parent
        assert isinstance(owner, GuestList)
        if clear:
            owner.set_filter("")
        owner.end_filtering()


class GuestList(Vertical):
    """Every attached guest, one row each: sortable (o, or click a header), filtered by typing (f)."""

    class Selected(Message):
        def __init__(self, name: str | None) -> None:
            super().__init__()
            self.name = name

    sort_key: reactive[SortKey] = reactive(SortKey.NAME, init=False)
    sort_reverse: reactive[bool] = reactive(False, init=False)

    def __init__(self, **kw: object) -> None:
        super().__init__(**kw)  # type: ignore[arg-type]
        self._rows: dict[str, GuestRow] = {}
        self._order: list[str] = []
        self._filter = ""
        self.selected: str | None = None

    def compose(self) -> ComposeResult:
        yield FilterInput(placeholder="filter: type part of a name, state or badge; Enter keeps it, Esc clears",
                          id="guest-filter", compact=True)
        table = GuestTable(id="guest-table", cursor_type="row", zebra_stripes=False)
        for key, label, _ in COLUMNS:
            table.add_column(label, key=key)
        yield table

    def on_mount(self) -> None:
        self.border_title = "guests"
        self.watch(self.app, "theme", lambda _: self._rebuild(), init=False)

    @property
    def table(self) -> GuestTable:
        return self.query_one(GuestTable)

    # -- data in ----------------------------------------------------------------------------------
    def show(self, rows: Sequence[GuestRow]) -> None:
        """Show ``rows``: rebuild when the visible order changed, else update only the changed cells."""
        old = self._rows
        self._rows = {r.name: r for r in rows}
        order = self._visible_order()
        if order != self._order:
            self._rebuild()
            return
        table = self.table
        for name in order:
            new, before = self._rows[name], old.get(name)
            if new == before:
                continue
            for (key, _, _), cell, was in zip(COLUMNS, self._cells(new),
                                              self._cells(before) if before else [None] * len(COLUMNS)):
                if was is None or cell != was:
                    wider = cell.cell_len > table.columns[ColumnKey(key)].content_width
                    table.update_cell(name, key, cell, update_width=wider)
        self._update_title()

    def _visible_order(self) -> list[str]:
        rows = sort_rows(list(self._rows.values()), self.sort_key, self.sort_reverse)
        return [r.name for r in rows if r.matches(self._filter)]

    def _rebuild(self) -> None:
        if not self.is_mounted:
            return
        table = self.table
        self._order = self._visible_order()
        table.clear()
        for name in self._order:
            table.add_row(*self._cells(self._rows[name]), key=name)
        if self.selected in self._order:
            table.move_cursor(row=self._order.index(self.selected), animate=False)
        elif self._order:
            table.move_cursor(row=0, animate=False)
        self._update_title()

    def _update_title(self) -> None:
        total, shown = len(self._rows), len(self._order)
        down = sum(1 for r in self._rows.values() if not r.reachable)
        migrating = sum(1 for r in self._rows.values() if r.badge in (Badge.ACTIVE, Badge.SETUP, Badge.POSTCOPY,
                                                                        Badge.WONT_CONVERGE))
        parts = [f"guests {shown}/{total}" if self._filter else f"guests {total}"]
        if migrating:
            parts.append(f"{migrating} migrating")
        if down:
            parts.append(f"{down} unreachable")
        arrow = "v" if self.sort_reverse else "^"
        title = ", ".join(parts)
        subtitle = f"sort: {self.sort_key.value} {arrow}" + (f" | filter: {self._filter}" if self._filter else "")
        if self.border_title != title:
            self.border_title = title
        if self.border_subtitle != subtitle:
            self.border_subtitle = subtitle

    def _cells(self, r: GuestRow) -> list[Text]:
        c = theme_colors(self)
        if not r.reachable:
            state = r.reason or r.state
            if len(state) > STATE_WIDTH:
                state = state[:STATE_WIDTH - 1] + "…"
            return [Text(r.name, style="dim"), Text(r.host, style="dim"), Text(state, style="dim italic"),
                    Text(r.ram_text, style="dim"), Text(r.kind, style="dim"), Text(r.state, style="dim")]
        badge_style = {Badge.ACTIVE: f"bold {c['accent']}", Badge.SETUP: c["accent"], Badge.POSTCOPY: f"bold {c['warn']}",
                       Badge.COMPLETED: c["good"], Badge.FAILED: f"bold {c['bad']}", Badge.CANCELLED: c["warn"],
                       Badge.WONT_CONVERGE: f"bold {c['bad']}", Badge.INCOMING: c["accent"]}.get(r.badge, "dim")
        state_style = "" if r.state == "running" else c["warn"]
        return [Text(r.name, style="bold"), Text(r.host), Text(r.state, style=state_style),
                Text(r.ram_text, justify="right"), Text(r.kind), Text(r.badge_text, style=badge_style)]

    # -- sorting and filtering ---------------------------------------------------------------------
    def watch_sort_key(self) -> None:
        self._rebuild()

    def watch_sort_reverse(self) -> None:
        self._rebuild()

    def cycle_sort(self) -> None:
        keys = [k for _, _, k in COLUMNS]
        self.sort_reverse = False
        self.sort_key = keys[(keys.index(self.sort_key) + 1) % len(keys)]

    @on(DataTable.HeaderSelected)
    def _header(self, event: DataTable.HeaderSelected) -> None:
        key = next(k for col, _, k in COLUMNS if col == event.column_key.value)
        if key == self.sort_key:
            self.sort_reverse = not self.sort_reverse
        else:
            self.sort_reverse = False
            self.sort_key = key

    def begin_filtering(self) -> None:
        self.add_class("-filtering")
        box = self.query_one(FilterInput)
        box.value = self._filter
        box.focus()

    def end_filtering(self) -> None:
        if not self._filter:
            self.remove_class("-filtering")
        self.table.focus()

    def set_filter(self, text: str) -> None:
        self._filter = text
        if not text and not self.query_one(FilterInput).has_focus:
            self.remove_class("-filtering")
        self._rebuild()

    @on(Input.Changed, "#guest-filter")
    def _filter_changed(self, event: Input.Changed) -> None:
        event.stop()
        self.set_filter(event.value)

    @property
    def filter_text(self) -> str:
        return self._filter

    @property
    def order(self) -> list[str]:
        return list(self._order)

    # -- selection --------------------------------------------------------------------------------
    @on(DataTable.RowHighlighted)
    def _highlighted(self, event: DataTable.RowHighlighted) -> None:
        name = event.row_key.value if event.row_key is not None else None
        if name != self.selected:
            self.selected = name
            self.post_message(self.Selected(name))

    def select(self, name: str) -> None:
        self.selected = name
        if name in self._order:
            self.table.move_cursor(row=self._order.index(name), animate=False)


# -- the migration pane ---------------------------------------------------------------------------

FIGURES: tuple[tuple[str, str], ...] = (
    ("remaining", "remaining"), ("dirty_rate", "dirty rate"), ("throughput", "throughput"),
    ("pass_no", "pass"), ("qemu_downtime", "QEMU downtime"), ("predicted_downtime", "predicted"),
    ("time_left", "time left"), ("elapsed", "elapsed"), ("throttle", "CPU throttle"),
)


class FigureGrid(Static):
    """The big figures, as one widget (one update, no reflow): a caption over each value, or side by
    side on short terminals."""

    def __init__(self, **kw: object) -> None:
        super().__init__(**kw)  # type: ignore[arg-type]
        self.figures: Figures | None = None
        self._lines = -1
        self._shape: tuple[bool, int] | None = None

    def show(self, figures: Figures) -> None:
        if figures != self.figures:
            self.figures = figures
            self._draw()

    def on_resize(self) -> None:
        self._draw()

    def _draw(self) -> None:
        f = self.figures or Figures()
        short = self.screen.has_class("-short") if self.is_attached else False
        cols = 3 if not short or self.size.width >= 66 else 2
        grid = Table.grid(expand=True, padding=(0, 2))
        for _ in range(cols):
            grid.add_column(ratio=1, no_wrap=True, overflow="ellipsis")
        cells = [Text.assemble((caption, "dim"), " " if short else "\n", (getattr(f, key), "bold"))
                 for key, caption in FIGURES]
        for i in range(0, len(cells), cols):
            row = cells[i:i + cols]
            grid.add_row(*row, *([""] * (cols - len(row))))
        lines = -(-len(cells) // cols) * (1 if short else 2)
        self.update(grid, layout=lines != self._lines)
        self._lines = lines


class SparkRow(Horizontal):
    def __init__(self, caption: str, **kw: object) -> None:
        super().__init__(**kw)  # type: ignore[arg-type]
        self.caption = caption

    def compose(self) -> ComposeResult:
        yield Static(self.caption, classes="spark-caption")
        yield Sparkline([], classes="spark")
        yield Static("", classes="spark-value")

    def set_data(self, data: tuple[float, ...], value: str) -> None:
        spark = self.query_one(Sparkline)
        if tuple(spark.data or ()) != data:
            spark.data = list(data)
        label = self.query_one(".spark-value", Static)
        if getattr(label, "_kvm_last", None) != value:
            label._kvm_last = value  # type: ignore[attr-defined]
            label.update(value, layout=False)


class MigrationPane(VerticalScroll):
    """The selected guest's migration: figures, verdict, progress, sparklines and decisions; or, with
    none running, the last one's summary and the dirty rate measured on demand."""

    def __init__(self, **kw: object) -> None:
        super().__init__(**kw)  # type: ignore[arg-type]
        self.view: PaneView | None = None

    def compose(self) -> ComposeResult:
        yield Static("", id="pane-headline")
        with Vertical(id="pane-migration"):
            with Horizontal(id="progress-row"):
                yield ProgressBar(total=1000, show_eta=False, id="progress")
                yield Static("", id="progress-note")
            yield FigureGrid(id="figures")
            yield Static("", id="verdict")
            yield SparkRow("remaining", id="spark-remaining", classes="spark-row")
            yield SparkRow("dirty rate", id="spark-dirty", classes="spark-row")
            yield SparkRow("throughput", id="spark-throughput", classes="spark-row")
            yield Static("", id="decisions")
        yield Static("", id="pane-summary")
        yield Static("", id="pane-dirty")

    def on_mount(self) -> None:
        self.border_title = "migration"
        self.watch(self.app, "theme", lambda _: self._redraw(), init=False)

    def _redraw(self) -> None:
        view, self.view = self.view, None
        if view is not None:
            self.show(view)

    def show(self, view: PaneView) -> None:
        old, self.view = self.view, view
        if old == view:
            return
        c = theme_colors(self)
        title = f"migration: {view.guest}" if view.guest else "migration"
        if view.migration is not None:
            title = f"migration: {view.migration.title}"
        if self.border_title != title:
            self.border_title = title
        self._set("#pane-headline", Text(view.headline, style=f"bold {c['bad']}") if view.headline else "")
        self.query_one("#pane-headline").display = bool(view.headline)
        mv = view.migration
        old_mv = old.migration if old is not None else None
        box = self.query_one("#pane-migration")
        box.display = mv is not None
        if mv is not None and mv != old_mv:
            self._show_migration(mv, old_mv, c)
        self._set("#pane-summary", Text(view.summary, style="dim" if mv is not None and mv.running else "")
                  if view.summary and (mv is None or not mv.running) else "")
        self.query_one("#pane-summary").display = bool(view.summary) and (mv is None or not mv.running)
        show_dirty = view.reachable and bool(view.dirty_rate) and (mv is None or not mv.running)
        self._set("#pane-dirty", Text(view.dirty_rate, style="dim") if show_dirty else "")
        self.query_one("#pane-dirty").display = show_dirty

    def _set(self, selector: str, content: Text | str, *, one_line: bool = False) -> None:
        """Update a Static if its content changed; reflow the screen only if its height may have."""
        w = self.query_one(selector, Static)
        text = content if isinstance(content, Text) else Text(content)
        key = text.markup
        if getattr(w, "_kvm_last", None) == key:
            return
        lines = 1 if one_line else self._height_of(text, w)
        reflow = getattr(w, "_kvm_lines", None) != lines
        w._kvm_last, w._kvm_lines = key, lines  # type: ignore[attr-defined]
        w.update(content, layout=reflow)

    def _height_of(self, text: Text, w: Static) -> int:
        width = w.content_size.width or self.content_size.width or 40
        if not text.plain:
            return 0
        return len(text.wrap(self.app.console, max(1, width)))

    def _show_migration(self, mv: MigrationView, old: MigrationView | None, c: dict[str, str]) -> None:
        self.query_one(FigureGrid).show(mv.figures)
        style = {"good": c["good"], "bad": c["bad"], "done": c["good"], "unknown": c["warn"]}[mv.verdict_kind]
        verdict = Text.assemble((mv.verdict.upper(), f"bold {style}"))
        if mv.reason and mv.verdict not in ("completed",):
            verdict.append(f"  {mv.reason}")
        if mv.advice:
            verdict.append(f"\n{mv.advice}", style=c["warn"])
        if mv.outcome:
            verdict.append(f"\n{mv.outcome}", style=c["good"] if mv.outcome_ok else c["bad"])
        self._set("#verdict", verdict)
        bar = self.query_one(ProgressBar)
        target = round((mv.fraction or 0.0) * 1000)
        if bar.progress != target:
            bar.update(progress=target)
        self._set("#progress-note", mv.progress_note, one_line=True)
        last = mv.figures
        self.query_one("#spark-remaining", SparkRow).set_data(mv.remaining, last.remaining)
        self.query_one("#spark-dirty", SparkRow).set_data(mv.dirty, last.dirty_rate)
        self.query_one("#spark-throughput", SparkRow).set_data(mv.throughput, last.throughput)
        decisions = Text("decisions: " + ("none yet" if not mv.decisions else ""), style="dim")
        for d in mv.decisions:
            decisions.append("\n" + d, style="")
        self._set("#decisions", decisions)


# -- the logs -------------------------------------------------------------------------------------

class EventLog(RichLog):
    """QMP events and kvmshell's decisions, timestamped; every guest's, or only the selected one's."""

    def __init__(self, hms: Callable[[float], str], **kw: object) -> None:
        super().__init__(wrap=True, markup=False, max_lines=2000, min_width=16, **kw)  # type: ignore[arg-type]
        self.hms = hms
        self.lines_kept: deque[LogLine] = deque(maxlen=2000)
        self.only: str | None = None          # None: every guest

    def on_mount(self) -> None:
        self._title()

    def _title(self) -> None:
        self.border_title = f"events: {self.only}" if self.only else "events: all guests"

    def add(self, line: LogLine) -> None:
        self.lines_kept.append(line)
        if self.only is None or line.guest == self.only:
            self.write(self._text(line))

    def _text(self, line: LogLine) -> Text:
        c = theme_colors(self)
        style = {"error": c["bad"], "good": c["good"], "decision": f"bold {c['accent']}"}.get(line.kind, "")
        return Text.assemble((self.hms(line.when) + " ", "dim"), (line.guest + " ", "bold"), (line.text, style))

    def set_scope(self, only: str | None) -> None:
        self.only = only
        self._title()
        self.clear()
        for line in self.lines_kept:
            if only is None or line.guest == only:
                self.write(self._text(line))


class OutputLog(RichLog):
    """What the commands printed."""

    def __init__(self, **kw: object) -> None:
        super().__init__(wrap=True, markup=False, max_lines=5000, min_width=16, **kw)  # type: ignore[arg-type]

    def on_mount(self) -> None:
        self.border_title = "output"


__all__ = ["EventLog", "FigureGrid", "GuestList", "GuestTable", "MigrationPane", "OutputLog", "SparkRow"]
