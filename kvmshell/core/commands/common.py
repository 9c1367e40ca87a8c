"""Helpers shared by the command handlers."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from typing import Any

from kvmshell.core.values.address import Protocol
from kvmshell.core.values.models import Event
from kvmshell.core.monitor.base import Monitor
from kvmshell.core.commands.session import Invocation
from kvmshell.errors import CommandFailed, Refused

LONG_TIMEOUT = 600.0      # savevm/loadvm of a big guest


def is_qmp(mon: Monitor) -> bool:
    return mon.protocol is Protocol.QMP


async def refuse_during_migration(inv: Invocation, what: str) -> None:
    info = await inv.monitor.migration()
    if info.status.is_active:
        raise Refused(f"{what} refused: a migration of this guest is {info.status} and {what} now would "
                      "pause it mid-migration; wait for it to finish or run migrate_cancel", guest=inv.guest)


def hmp_quote(word: str) -> str:
    """A word as HMP's parser reads it back (quotes when it has spaces or quotes)."""
    if word and not any(c.isspace() or c in "\"'\\" for c in word):
        return word
    return '"' + word.replace("\\", "\\\\").replace('"', '\\"') + '"'


async def run_job(inv: Invocation, command: str, args: Mapping[str, Any], what: str,
                  timeout: float = LONG_TIMEOUT) -> None:
    """Run a QMP job command (snapshot-save/-load/-delete) to its end, reporting progress each second;
    raise CommandFailed with the job's error. Waits on JOB_STATUS_CHANGE events, not by polling."""
    mon = inv.monitor
    job_id = f"kvmshell-{command}-{int(time.time() * 1000)}"
    concluded = asyncio.Event()

    def on_event(ev: Event) -> None:
        if ev.name == "JOB_STATUS_CHANGE" and ev.data.get("id") == job_id and ev.data.get("status") == "concluded":
            concluded.set()

    unsubscribe = mon.subscribe(on_event)
    start = time.monotonic()
    try:
        await mon.execute(command, {"job-id": job_id, **args})
        async with asyncio.timeout(timeout):
            while not concluded.is_set():
                try:
                    async with asyncio.timeout(1.0):
                        await concluded.wait()
                except TimeoutError:
                    inv.progress(f"{what}... {time.monotonic() - start:.0f} s")
        jobs = await mon.execute("query-jobs")
        job = next((j for j in jobs if j.get("id") == job_id), {})
        await mon.execute("job-dismiss", {"id": job_id})
        if job.get("error"):
            raise CommandFailed(str(job["error"]), guest=inv.guest)
    except TimeoutError:
        raise CommandFailed(f"{what}: not finished after {timeout:.0f} s (job {job_id} is still running)",
                            guest=inv.guest) from None
    finally:
        unsubscribe()


async def with_ticker(inv: Invocation, what: str, coro: Any) -> Any:
    """Await ``coro`` and report progress every second while it runs (for blocking HMP commands)."""
    start = time.monotonic()
    task = asyncio.ensure_future(coro)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=1.0)
            if done:
                return task.result()
            inv.progress(f"{what}... {time.monotonic() - start:.0f} s")
    finally:
        if not task.done():
            task.cancel()
