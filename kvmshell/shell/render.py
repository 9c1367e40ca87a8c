"""Outcomes and events as text for the prompt (and for -c/run): one place decides the look."""

from __future__ import annotations

import json
from collections.abc import Sequence

from kvmshell.core.commands.results import Outcome
from kvmshell.core.values.models import Event, MigrationStatus

# events worth a line above the prompt, and how to say them
_EVENT_TEXT = {
    "STOP": "stopped", "RESUME": "resumed", "SHUTDOWN": "shut down", "RESET": "reset",
    "POWERDOWN": "powerdown requested", "GUEST_PANICKED": "guest panicked",
}


def outcome_lines(outcomes: Sequence[Outcome], grouped: bool) -> list[tuple[str, str]]:
    """(style, text) lines. ``grouped`` puts a header per guest (for @all or several targets)."""
    lines: list[tuple[str, str]] = []
    for o in outcomes:
        if grouped and o.guest is not None:
            lines.append(("class:header", f"── {o.guest} ──"))
        if not o.ok:
            where = f"{o.guest}: " if o.guest and not grouped else ""
            lines.append(("class:error", f"error: {o.error_title}: {where}{o.error}"))
            continue
        assert o.result is not None
        text = o.result.text()
        for line in text.splitlines():
            style = "class:warning" if line.startswith("warning: ") else ""
            lines.append((style, line))
    return lines


def outcomes_json(outcomes: Sequence[Outcome], line: str | None = None) -> str:
    """One command line's outcomes as one JSON object on one line (`-c`/`run` with --json):
    ``{"line", "ok", "outcomes": [{"guest", "ok", "result"} | {"guest", "ok": false, "error", "title"}]}``."""
    items = []
    for o in outcomes:
        item: dict[str, object] = {"guest": o.guest, "ok": o.ok}
        if o.ok and o.result is not None:
            item["result"] = o.result.to_json()
        else:
            item["error"] = o.error
            item["title"] = o.error_title
        items.append(item)
    return json.dumps({"line": line, "ok": all(o.ok for o in outcomes), "outcomes": items})


def event_line(ev: Event) -> str | None:
    """A one-line notice for the events an admin wants to see as they happen; None for the rest."""
    if ev.name == "MIGRATION":
        status = ev.migration_status
        if status in (MigrationStatus.COMPLETED, MigrationStatus.FAILED, MigrationStatus.CANCELLED,
                      MigrationStatus.POSTCOPY_ACTIVE, MigrationStatus.POSTCOPY_PAUSED):
            return f"{ev.guest}: migration {status}"
        return None
    if ev.name == "kvmshell.MIGRATION_DECISION":
        if ev.data.get("decision") == "start":
            return None
        return f"{ev.guest}: {ev.data.get('decision')}: {ev.data.get('reason')}"
    if ev.name == "kvmshell.MIGRATION_FINISHED":
        return f"{ev.guest}: migration {ev.data.get('status')}: {ev.data.get('message')}"
    if ev.name == "kvmshell.DISCONNECTED":
        return f"{ev.guest}: monitor lost ({ev.data.get('reason')})"
    if ev.name == "kvmshell.CONNECTED":
        return f"{ev.guest}: note: {ev.data['notice']}" if ev.data.get("notice") else None
    if ev.name == "kvmshell.UNREACHABLE":
        return None
    if ev.name in _EVENT_TEXT:
        return f"{ev.guest}: {_EVENT_TEXT[ev.name]}"
    return None
