"""`kvmshell history` (the migrations kvmshell ran, from the state directory) and the ID that
`kvmshell report ID|FILE` takes."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TextIO

from kvmshell.cli.common import Exit
from kvmshell.core.migration.history import MigrationHistory
from kvmshell.core.values.units import human_bytes
from kvmshell.errors import ConfigError


def cmd_history(args: argparse.Namespace, out: TextIO, history: MigrationHistory | None = None) -> Exit:
    history = history or MigrationHistory.default()
    entries = history.entries()
    if args.json:                       # one document: the entries, oldest first
        json.dump([e.to_json() for e in entries], out, indent=2)
        out.write("\n")
        return Exit.OK
    if not entries:
        out.write(f"no migration yet (kvmshell keeps the last {history.cap} in {history.dir})\n")
        return Exit.OK
    table = [("ID", "GUEST", "FROM", "TO", "STRATEGY", "OUTCOME", "TIME", "DOWNTIME", "SENT")] + [
        (e.id, e.guest, e.source, e.dest, e.strategy, e.outcome,
         f"{e.total_s:.2f} s" if e.total_s is not None else "-",
         f"{e.downtime_ms} ms" if e.downtime_ms is not None else "-",
         human_bytes(e.bytes) if e.bytes is not None else "-") for e in entries]
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    for row in table:
        out.write("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() + "\n")
    return Exit.OK


def trace_file(name: str, history: MigrationHistory | None = None) -> Path:
    """What `report` reads: FILE if it exists, else the trace of the migration with that ID."""
    path = Path(name)
    if path.exists():
        return path
    history = history or MigrationHistory.default()
    entry = history.find(name)
    if entry is None:
        raise ConfigError(f"report {name}: no such file, and no migration with that ID in the history "
                          "(`kvmshell history` lists them)")
    if not Path(entry.trace).exists():
        raise ConfigError(f"report {name}: its trace {entry.trace} is gone")
    return Path(entry.trace)
