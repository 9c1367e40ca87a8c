"""`kvmshell history` (the migrations kvmshell ran, from the state directory) and the ID that
`kvmshell report ID|FILE` takes."""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path
from typing import TextIO

from kvmshell.cli.common import Exit
from kvmshell.core.migration.history import MigrationHistory
from kvmshell.core.migration.model.report import Summary
from kvmshell.core.migration.model.samples import Trace
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


def static_summary(trace: Trace, summary: Summary) -> Summary:
    """A static migration's trace (savevm, copy, loadvm: no samples) ends with an ``outcome`` event
    that says how it ended and what the copy sent; the summary of samples alone would say unfinished."""
    ends = [e for e in trace.events if e.source == "kvmshell" and e.name == "outcome"]
    if trace.samples or trace.header.strategy != "static" or not ends:
        return summary
    end = ends[-1]
    sent = end.detail.get("sent_bytes")
    sent = sent if isinstance(sent, int) else 0
    return dataclasses.replace(summary, outcome=str(end.detail.get("status", summary.outcome)), total_s=end.t,
                               bytes_sent=sent, mean_throughput=sent / end.t if end.t > 0 else 0.0)
