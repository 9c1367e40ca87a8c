"""`-c`, `run FILE` and stdin: command lines run without a prompt, their outcomes printed."""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections.abc import Sequence
from typing import TextIO

from kvmshell.cli.common import Exit
from kvmshell.cli.inventory import inventory, make_fleet, warn_exposed
from kvmshell.config import Config
from kvmshell.core.commands.registry import default_registry
from kvmshell.core.commands.session import Session
from kvmshell.core.monitor.fleet import GuestState
from kvmshell.core.values.models import MigrationStatus
from kvmshell.errors import KvmError


async def open_session(args: argparse.Namespace, config: Config, err: TextIO, *, interactive: bool) -> Session:
    guests = inventory(args, config)
    warn_exposed(guests, err)
    fleet = make_fleet(guests, config, args)
    await fleet.start()
    if fleet.hosts is not None:
        fleet.hosts.password_prompt = None      # asked before the UI starts, never under it
    for g in fleet:
        if g.state is not GuestState.CONNECTED:
            err.write(f"kvmshell: {g.name}: {g.reason} (retrying in the background)\n" if interactive
                      else f"kvmshell: {g.name}: {g.reason}\n")
    current = fleet.names[0] if len(fleet) == 1 else None
    return Session(fleet, default_registry(), config, assume_yes=args.yes, current=current)


async def close_session(session: Session) -> None:
    await session.aclose()
    await session.fleet.aclose()


async def run_lines(session: Session, lines: Sequence[str], args: argparse.Namespace, out: TextIO,
                    err: TextIO, source: str) -> Exit:
    """Non-interactive: run each line, print its outcomes, stop at the first failure unless --keep-going."""
    from kvmshell.core.commands.results import Watch
    from kvmshell.shell.render import outcome_lines, outcomes_json
    status = Exit.OK
    if source == "-c" and sys.stdin.isatty() and sys.stdout.isatty() and session.editor is None:
        from kvmshell.core.commands.editor import edit_text

        async def edit(text: str) -> str:
            return await asyncio.to_thread(edit_text, text)
        session.editor = edit              # `-c "static-migrate ... --edit"` from a terminal
    for number, line in enumerate(lines, 1):
        outcomes = await session.run_line(line)
        if not outcomes:
            continue
        for o in outcomes:
            if o.ok and isinstance(o.result, Watch):
                # with --json the live view goes to stderr, and the line's object holds the last one
                final = await _watch_plain(session, o.result.line, o.result.interval, o.guest, err if args.json else out)
                outcomes = final if args.json else []
        if args.json:
            out.write(outcomes_json(outcomes, line) + "\n")
        else:
            grouped = len(outcomes) > 1
            for style, text in outcome_lines([o for o in outcomes if o.ok], grouped):
                out.write(text + "\n")
        failed = [o for o in outcomes if not o.ok]
        for o in failed:
            where = f"{o.guest}: " if o.guest else ""
            loc = f"{source}:{number}: " if source != "-c" else ""
            err.write(f"kvmshell: {loc}{where}{o.error}\n")
        out.flush()
        if failed:
            status = Exit.FAILED
            if not args.keep_going:
                break
    return status


async def _watch_plain(session: Session, line: str, interval: float, guest: str | None, out: TextIO) -> list:
    """Without a prompt: print the watched output until the migration ends (or Ctrl-C)."""
    from kvmshell.shell.render import outcome_lines
    target_line = f"@{guest} {line}" if guest else line
    while True:
        outcomes = await session.run_line(target_line)
        out.write(f"--- {time.strftime('%H:%M:%S')}\n")
        for _, text in outcome_lines(outcomes, len(outcomes) > 1):
            out.write(text + "\n")
        out.flush()
        if not all(o.ok for o in outcomes) or not any([await _under_way(session, o.guest) for o in outcomes]):
            return outcomes
        await asyncio.sleep(interval)


async def _under_way(session: Session, guest: str | None) -> bool:
    """The guest's migration goes on by itself: kvmshell still follows it, or QEMU still moves it (a
    postcopy paused waits for the user, and is not watched further)."""
    if guest is None:
        return False
    if session.running_job(guest) is not None:
        return True
    try:
        status = (await session.fleet.monitor(guest).migration()).status
    except KvmError:
        return False
    return status.is_active and status is not MigrationStatus.POSTCOPY_PAUSED


async def cmd_lines(args: argparse.Namespace, config: Config, out: TextIO, err: TextIO,
                    lines: Sequence[str], source: str) -> Exit:
    session = await open_session(args, config, err, interactive=False)
    try:
        return await run_lines(session, lines, args, out, err, source)
    finally:
        await close_session(session)
