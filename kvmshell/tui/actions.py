"""Every dashboard action, defined once: its key binding, footer entry, palette entry and help line
all come from this table."""

from __future__ import annotations

from dataclasses import dataclass

from textual.binding import Binding


@dataclass(frozen=True)
class Action:
    name: str                 # App.action_<name>
    keys: str                 # textual key names, comma-separated
    label: str                # footer
    title: str                # command palette
    help: str                 # palette help line and the help screen
    show: bool = True         # in the footer
    key_display: str | None = None


ACTIONS: tuple[Action, ...] = (
    Action("migrate", "m", "Migrate", "Migrate the selected guest",
           "open the migrate dialog: destination, strategy, limits, and the model's prediction before you confirm"),
    Action("cancel_migration", "c", "Cancel", "Cancel the migration",
           "cancel the selected guest's migration (asks first; the guest keeps running here)"),
    Action("savevm", "s", "Save", "Save a snapshot (savevm)", "save the selected guest's state under a tag"),
    Action("loadvm", "l", "Load", "Load a snapshot (loadvm)",
           "restore the selected guest to a snapshot (asks before replacing a running guest's state)"),
    Action("command_bar", "slash,colon", "Command", "Command bar",
           "type any kvmshell command (TAB completes, Up/Down history shared with `kvmshell shell`)",
           key_display="/"),
    Action("dirty_rate", "d", "Dirty rate", "Measure the dirty rate",
           "measure how fast the selected guest dirties memory (calc-dirty-rate for 1 s, on demand only)"),
    Action("filter", "f", "Filter", "Filter the guest list", "type to filter the guest list; Escape clears it"),
    Action("sort", "o", "Sort", "Sort the guest list", "sort by the next column (or click a column header)",
           show=False),
    Action("events_scope", "e", "Events", "Events of all guests / the selected one",
           "switch the events log between every guest and the selected guest", show=False),
    Action("toggle_theme", "t", "Theme", "Dark / light theme", "switch between the dark and the light theme",
           show=False),
    Action("help", "question_mark", "Help", "Help", "the keys and the commands", key_display="?"),
    Action("quit", "q", "Quit", "Quit kvmshell", "leave the dashboard (asks while a migration runs)"),
)



def bindings() -> list[Binding]:
    """The dashboard screen's bindings; they call the app's actions."""
    return [Binding(a.keys, f"app.{a.name}", a.label, show=a.show, key_display=a.key_display, tooltip=a.help)
            for a in ACTIONS]


def key_text(a: Action) -> str:
    names = {"slash": "/", "colon": ":", "question_mark": "?"}
    return " ".join(names.get(k, k) for k in a.keys.split(","))
