"""Past migrations in the dashboard: the command bar's `history` lists them, `replay [ID]` shows one
(the last by default) in the migration pane, from the trace the history kept."""

from __future__ import annotations

from dataclasses import replace

from kvmshell.core.migration.history import MigrationHistory
from kvmshell.core.migration.model.samples import load_trace
from kvmshell.core.values.units import human_bytes
from kvmshell.errors import KvmError
from kvmshell.tui.replay import ReplaySource
from kvmshell.tui.views import PaneView

COMMANDS = ("history", "replay")


def history_lines(history: MigrationHistory) -> list[str]:
    entries = history.entries()
    if not entries:
        return [f"no migration yet (kvmshell keeps the last {history.cap} in {history.dir})"]
    return [f"{e.id}  {e.guest} -> {e.dest}  {e.strategy}  {e.outcome}"
            + (f"  {e.total_s:.2f} s" if e.total_s is not None else "")
            + (f"  downtime {e.downtime_ms} ms" if e.downtime_ms is not None else "")
            + (f"  {human_bytes(e.bytes)}" if e.bytes is not None else "") for e in entries[-20:]] + [
        "`replay ID` shows one in the migration pane"]


def past_pane(history: MigrationHistory, ident: str | None) -> PaneView:
    """The pane's view of a past migration, at its end; KvmError when there is none such."""
    entries = history.entries()
    entry = entries[-1] if entries and ident is None else history.find(ident) if ident else None
    if entry is None:
        raise KvmError(f"no migration {ident!r} in the history (`history` lists them)" if ident
                       else "no migration in the history yet", title="replay")
    try:
        trace = load_trace(entry.trace)
    except (OSError, ValueError) as e:
        raise KvmError(f"{entry.id}: cannot read its trace {entry.trace}: {e}", title="replay") from None
    end = trace.samples[-1].t if trace.samples else 0.0
    view = ReplaySource(trace, end, dest=entry.dest).pane(trace.header.guest)
    if view.migration is None:
        return view
    return replace(view, migration=replace(view.migration, title=f"{entry.id} (past): {view.migration.title}",
                                           outcome=view.migration.outcome or entry.outcome))
