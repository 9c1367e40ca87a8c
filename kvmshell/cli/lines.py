"""`-c`, `run FILE` and stdin: command lines run without a prompt, their outcomes printed; the
migrations a line starts are followed to their end (``follow``) before the next line runs."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import Collection, Coroutine, Sequence
from typing import Any, TextIO

from kvmshell.cli.common import Exit
from kvmshell.cli.follow import Follower, Progress, ctrl_c_sets, exit_for, outcome_of, worse
from kvmshell.cli.inventory import inventory, make_fleet, warn_exposed
from kvmshell.config import Config
from kvmshell.core.commands.builtin import unfollowed_status
from kvmshell.core.commands.registry import default_registry
from kvmshell.core.commands.results import Outcome
from kvmshell.core.commands.session import Session
from kvmshell.core.monitor.fleet import GuestState
from kvmshell.core.values.address import Kind
from kvmshell.core.values.models import MigrationStatus
from kvmshell.errors import KvmError


async def open_session(args: argparse.Namespace, config: Config, err: TextIO, *, interactive: bool) -> Session:
    guests = inventory(args, config)
    warn_exposed(guests, err)
    fleet = make_fleet(guests, config, args)
    await fleet.start()
    if fleet.hosts is not None:
        fleet.hosts.password_prompt = None      # asked before the UI starts, never under it
    if interactive:                         # without a prompt, the lines say it (see ``cmd_lines``)
        for g in fleet:
            if g.state is not GuestState.CONNECTED:
                err.write(f"kvmshell: {g.name}: {g.reason} (retrying in the background)\n")
    current = fleet.names[0] if len(fleet) == 1 else None
    return Session(fleet, default_registry(), config, assume_yes=args.yes, current=current)


async def say_unfollowed(session: Session, err: TextIO) -> None:
    """On attach: one line per guest whose migration runs with no kvmshell following it."""
    attached = [g for g in session.fleet if g.state is GuestState.CONNECTED and g.monitor is not None]
    said = await asyncio.gather(*(unfollowed_status(g.monitor) for g in attached if g.monitor is not None))
    for g, status in zip(attached, said):
        if status is not None:
            err.write(f"kvmshell: {g.name}: {status}\n")


async def close_session(session: Session) -> None:
    await session.aclose()
    await session.fleet.aclose()


async def run_lines(session: Session, lines: Sequence[str], args: argparse.Namespace, out: TextIO,
                    err: TextIO, source: str, failed: set[str] | None = None) -> Exit:
    """Non-interactive: run each line, print its outcomes, stop at the first failure unless --keep-going.
    A migration a line starts is followed to its end (see ``follow``) unless --detach leaves it.
    The guests whose failures were printed are added to ``failed``."""
    status = Exit.OK
    if source == "-c" and sys.stdin.isatty() and sys.stdout.isatty() and session.editor is None:
        from kvmshell.core.commands.editor import edit_text

        async def edit(text: str) -> str:
            return await asyncio.to_thread(edit_text, text)
        session.editor = edit              # `-c "static-migrate ... --edit"` from a terminal
    progress = Progress(err)
    session.progress_sink = progress.sink
    for g in session.fleet:                # e.g. libvirt: the domain is now marked tainted
        if g.monitor is not None and g.monitor.notice:
            err.write(f"kvmshell: note: {g.name}: {g.monitor.notice}\n")
    for number, line in enumerate(lines, 1):
        loc = f"{source}:{number}: " if source != "-c" else ""
        line_status = await _run_line(session, line, args, out, err, progress, loc, failed)
        status = worse(status, line_status)
        if line_status is Exit.INTERRUPTED or (line_status is not Exit.OK and not args.keep_going):
            break
    return status


async def _run_line(session: Session, line: str, args: argparse.Namespace, out: TextIO, err: TextIO,
                    progress: Progress, loc: str, failed: set[str] | None = None) -> Exit:
    from kvmshell.core.commands.results import Watch
    before = dict(session.migrations)
    outcomes = await _interruptible(session.run_line(line))
    if outcomes is None:
        err.write(f"kvmshell: {loc}interrupted\n")
        return Exit.INTERRUPTED
    if not outcomes:
        return Exit.OK
    started = {g: j for g, j in session.migrations.items() if before.get(g) is not j}
    flags = _migrate_flags(session, line)
    watched = [o for o in outcomes if o.ok and isinstance(o.result, Watch)]
    status = Exit.OK
    if flags.get("to_host") or any(session.fleet.get(g).address.kind is Kind.DOMAIN for g in started):
        # its handler followed it to the end (a libvirt guest's always does): the outcome decides
        for job in started.values():
            status = worse(status, exit_for(job.outcome))
        started = {}
    if not (watched or started):
        return worse(status, Exit.OK if _print(outcomes, args, out, err, loc, line=line, failed=failed) else Exit.FAILED)
    with ctrl_c_sets(asyncio.Event()) as stop:
        follower = Follower(session, progress, stop)
        if watched:
            for o in watched:
                assert isinstance(o.result, Watch)
                await _watch_plain(session, o.result.line, o.result.interval, o.guest, err if args.json else out, stop)
            outcomes = [o for o in outcomes if o not in watched]
        elif args.detach or flags.get("detach"):
            if not _print(outcomes, args, out, err, loc, line=line, failed=failed):
                status = worse(status, Exit.FAILED)
            outcomes = []
            started = follower.detach(started)
        else:                               # the start is progress; the outcome comes at the end
            for o in outcomes:
                if o.ok and o.guest in started and o.result is not None:
                    progress.say(f"{o.guest}: {o.result.text()}")
            outcomes = [o for o in outcomes if not (o.ok and o.guest in started)]
        if started and not await follower.follow(started):
            await follower.interrupted(started)
            return Exit.INTERRUPTED
        if stop.is_set():                   # Ctrl-C as it ended: the outcome, then stop
            status = worse(status, Exit.INTERRUPTED)
    for job in started.values():
        status = worse(status, exit_for(job.outcome))
    outcomes += [outcome_of(g, j.outcome, await follower.detail(j)) for g, j in started.items()]
    if not _print(outcomes, args, out, err, loc, followed=set(started), line=line, failed=failed):
        status = worse(status, Exit.FAILED)
    return status


async def _interruptible(coro: Coroutine[Any, Any, list[Outcome]]) -> list[Outcome] | None:
    """Run a line; Ctrl-C cancels it (it undoes what it can and says so) and gives None. A cancel that
    was taken back (``uncancel``, as asyncio.timeout does when its own timeout fires at the same moment)
    is repeated; one the line is handling (its undo) is left to finish."""
    task = asyncio.ensure_future(coro)
    with ctrl_c_sets(asyncio.Event()) as stop:
        stopper = asyncio.ensure_future(stop.wait())
        try:
            await asyncio.wait({task, stopper}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopper.cancel()
        if not task.done():
            task.cancel()
        while not task.done():
            await asyncio.wait({task}, timeout=1.0)
            if not task.done() and task.cancelling() == 0:
                task.cancel()
    return None if task.cancelled() else task.result()


def _print(outcomes: list[Outcome], args: argparse.Namespace, out: TextIO, err: TextIO, loc: str,
           followed: Collection[str] = (), line: str | None = None, failed: set[str] | None = None) -> bool:
    """Write the outcomes (a followed migration's on stdout, ok or not); False if a line failed."""
    from kvmshell.shell.render import outcome_lines, outcomes_json
    if not outcomes:
        return True
    if args.json:
        out.write(_with_followed(outcomes_json(outcomes, line), outcomes, followed) + "\n")
    else:
        mine = [o for o in outcomes if o.ok and o.guest not in followed]
        for _, text in outcome_lines(mine, len(outcomes) > 1):
            out.write(text + "\n")
        for o in outcomes:
            if o.guest in followed and o.result is not None:
                out.write(f"{o.guest}: {o.result.text()}\n")
    for o in outcomes:
        if not o.ok and o.guest not in followed:
            where = f"{o.guest}: " if o.guest else ""
            err.write(f"kvmshell: {loc}{where}{o.error}\n")
            if failed is not None and o.guest:
                failed.add(o.guest)
    out.flush()
    return all(o.ok for o in outcomes if o.guest not in followed)


def _with_followed(text: str, outcomes: list[Outcome], followed: Collection[str]) -> str:
    """A followed migration that did not complete keeps its result beside the error (its status, times,
    bytes, QEMU's error, where each side is): a script sees why it failed."""
    if not any(not o.ok and o.guest in followed and o.result is not None for o in outcomes):
        return text
    doc = json.loads(text)
    for item, o in zip(doc["outcomes"], outcomes):
        if not o.ok and o.guest in followed and o.result is not None:
            item["result"] = o.result.to_json()
    return json.dumps(doc)


def _migrate_flags(session: Session, line: str) -> dict[str, object]:
    """The flags of a `migrate` line (planning sends nothing); empty for any other line."""
    try:
        plan = session.plan(line)
    except KvmError:
        return {}
    if plan is None or plan.parsed is None or plan.parsed.spec.name != "migrate":
        return {}
    return plan.parsed.flags


async def _watch_plain(session: Session, line: str, interval: float, guest: str | None, out: TextIO,
                       stop: asyncio.Event) -> None:
    """Without a prompt: print the watched output until the migration ends (or Ctrl-C sets ``stop``)."""
    from kvmshell.shell.render import outcome_lines
    target_line = f"@{guest} {line}" if guest else line
    while not stop.is_set():
        outcomes = await session.run_line(target_line)
        out.write(f"--- {time.strftime('%H:%M:%S')}\n")
        for _, text in outcome_lines(outcomes, len(outcomes) > 1):
            out.write(text + "\n")
        out.flush()
        if not all(o.ok for o in outcomes) or not any([await _under_way(session, o.guest) for o in outcomes]):
            return
        try:
            async with asyncio.timeout(interval):
                await stop.wait()
        except TimeoutError:
            pass


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
    unreachable = [g for g in session.fleet if g.state is not GuestState.CONNECTED]
    failed: set[str] = set()
    try:
        await say_unfollowed(session, err)
        status = await run_lines(session, lines, args, out, err, source, failed)
    finally:
        await close_session(session)
    for g in unreachable:                   # said once: by the line that failed on it, or here
        if g.name not in failed:
            err.write(f"kvmshell: {g.name}: {g.reason}\n")
    return status
