"""The migration capabilities and parameters a job changes on each side, and putting them back.

Every change the job makes to a side's capabilities or parameters goes through ``Settings``, which
first records the value each one had (once: the value before kvmshell's first change), so that at
the end the side can be left as it was: a failed, stalled or cancelled migration must not leave
auto-converge on, the throttle raised, the bandwidth uncapped or ``pause-before-switchover`` on for
the next plain `migrate`. TLS keeps its own undo (``tls.disable``): it also drops the objects it
created, and its parameters never pass through here.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field

from kvmshell.core.monitor.base import Monitor
from kvmshell.core.values.models import ParamValue
from kvmshell.errors import CommandFailed, Disconnected, KvmError

IDLE_TIMEOUT_S = 5.0            # a cancel takes a moment to go from `cancelling` to `cancelled`
ANSWER_TIMEOUT_S = 3.0          # a side that does not answer (a frozen destination) is not waited for


@dataclass
class Before:
    """One side's capabilities and parameters as they were before kvmshell changed them."""

    capabilities: dict[str, bool] = field(default_factory=dict)
    parameters: dict[str, ParamValue] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.capabilities or self.parameters)


@dataclass(frozen=True)
class PutBack:
    """What became of one side's settings: ``done`` the names put back (with their values), or why not."""

    guest: str
    done: tuple[str, ...] = ()
    gone: bool = False           # the side's QEMU has quit (its settings with it)
    busy: str | None = None      # its migration is still going (its status): left as they are
    failed: str | None = None


def _text(value: ParamValue) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    return str(value)


class Settings:
    """The values before kvmshell's changes, per side (by the guest's name)."""

    def __init__(self) -> None:
        self._before: dict[str, Before] = {}
        self.on_change: Callable[[], None] | None = None     # told before each change, the values recorded

    def _changing(self) -> None:
        if self.on_change is not None:
            self.on_change()

    def before(self, guest: str) -> Before:
        return self._before.setdefault(guest, Before())

    async def set_capabilities(self, mon: Monitor, caps: Mapping[str, bool]) -> None:
        """Set those of ``caps`` that differ, recording their values first; CommandFailed if one that
        should be on is unknown to this QEMU (one that should be off and is unknown is off anyway)."""
        have = await mon.migrate_capabilities()
        missing = [k for k, v in caps.items() if v and k not in have]
        if missing:
            raise CommandFailed(f"this QEMU lacks the migration capabilities {', '.join(missing)}", guest=mon.name)
        wanted = {k: v for k, v in caps.items() if k in have and have[k] != v}
        if not wanted:
            return
        saved = self.before(mon.name).capabilities
        for k in wanted:
            saved.setdefault(k, have[k])
        self._changing()
        await mon.set_capabilities(wanted)

    async def set_parameters(self, mon: Monitor, params: Mapping[str, ParamValue]) -> None:
        """Set ``params``, recording the values of those not recorded yet (one query the first time)."""
        saved = self.before(mon.name).parameters
        if any(k not in saved for k in params):
            now = await mon.migrate_parameters()
            for k in params:
                v = now.get(k)
                if v is not None:       # a parameter this QEMU does not report: setting it fails anyway
                    saved.setdefault(k, v)
        self._changing()
        await mon.set_parameters(params)

    async def restore(self, source: Monitor, dest: Monitor | None, ended: str) -> list[str]:
        """Put both sides back after a migration that ``ended`` so (an outcome's status, or
        "interrupted": kvmshell is closing); the notes.
        After success the source goes back as it was (it stays paused with the guest's memory, and
        nothing follows its migration any more) and the destination too, but for ``events``: the
        guest runs there now and kvmshell follows it by its events. A migration paused in postcopy
        keeps everything: its recovery needs postcopy-ram and the same parameters."""
        sides = [m for m in (source, dest) if m is not None and self._before.get(m.name)
                 and not m.settings_per_migration]
        if not sides:
            return []
        if ended == "postcopy-paused":
            return [f"migration settings left as kvmshell set them on {' and '.join(m.name for m in sides)}: "
                    f"the recovery needs them"]
        completed = ended == "completed"
        idle = 0.0 if ended == "interrupted" else IDLE_TIMEOUT_S     # kvmshell is closing: no waiting
        results = [await self.put_back(source, wait_idle=idle)] if source in sides else []
        kept = ""
        if dest is not None:
            keep = ("events",) if completed else ()
            if completed and self.before(dest.name).capabilities.get("events") is False:
                kept = f"events kept on on {dest.name}: the guest runs there"
            # kvmshell closing mid-way: the destination's incoming migration runs on and needs them too
            look = idle if completed or ended == "interrupted" else None
            results.append(await self.put_back(dest, keep=keep, wait_idle=look))
        return say(results, receiver=dest.name if dest is not None else None, kept=kept)

    async def put_back(self, mon: Monitor, *, keep: Collection[str] = (),
                       wait_idle: float | None = IDLE_TIMEOUT_S) -> PutBack | None:
        """Put back every recorded setting of ``mon`` but ``keep``; None if nothing was changed there.
        ``wait_idle``: first wait up to so many seconds for a migration there to end, and leave
        everything as it is if it does not (QEMU refuses capabilities while one runs; parameters
        would steer it); None: do not look (a destination waiting for its stream says `setup`)."""
        before = self._before.get(mon.name)
        if not before:
            return None
        caps = {k: v for k, v in before.capabilities.items() if k not in keep}
        params = {k: v for k, v in before.parameters.items() if k not in keep}
        if not (caps or params):
            return None
        if not mon.connected:
            return PutBack(mon.name, gone=True)
        try:
            if wait_idle is not None:
                status = await self._idle(mon, wait_idle)
                if status is not None:
                    return PutBack(mon.name, busy=status)
            # off first: a capability may be refused while another one it excludes is still on
            ordered = dict(sorted(caps.items(), key=lambda kv: kv[1]))
            async with asyncio.timeout(ANSWER_TIMEOUT_S):
                if ordered:
                    await mon.set_capabilities(ordered)
                if params:
                    await mon.set_parameters(params)
        except TimeoutError:
            return PutBack(mon.name, failed=f"{', '.join([*caps, *params])}: no answer within {ANSWER_TIMEOUT_S:g} s")
        except Disconnected:
            return PutBack(mon.name, gone=True)
        except KvmError as e:
            if not mon.connected:
                return PutBack(mon.name, gone=True)
            return PutBack(mon.name, failed=f"{', '.join([*caps, *params])}: {e.message}")
        for k in [*caps, *params]:
            before.capabilities.pop(k, None)
            before.parameters.pop(k, None)
        return PutBack(mon.name, done=tuple(f"{k} {_text(v)}" for k, v in [*ordered.items(), *params.items()]))

    @staticmethod
    async def _idle(mon: Monitor, timeout: float) -> str | None:
        """None once ``mon`` has no migration running (within ``timeout`` s); else its status."""
        try:
            async with asyncio.timeout(ANSWER_TIMEOUT_S):
                status = (await mon.migration()).status
        except TimeoutError:
            return f"unknown (no answer within {ANSWER_TIMEOUT_S:g} s)"
        try:
            async with asyncio.timeout(timeout):
                while status.is_active:
                    await asyncio.sleep(0.05)
                    status = (await mon.migration()).status
        except TimeoutError:
            return str(status)
        return None


def say(results: list[PutBack | None], *, receiver: str | None = None, kept: str = "") -> list[str]:
    """The outcome's notes: one line for what was put back (``kept``: what was not, on purpose), one
    for each side where it could not be; ``receiver``: the destination's name."""
    notes: list[str] = []
    done = [r for r in results if r is not None and r.done]
    if done:
        notes.append("migration settings put back: " + "; ".join(f"on {r.guest} {', '.join(r.done)}" for r in done)
                     + (f" ({kept})" if kept else ""))
    for r in results:
        if r is None:
            continue
        if r.gone:
            why = " (QEMU 7.2 quits after a cancelled or failed incoming migration)" if r.guest == receiver else ""
            notes.append(f"{r.guest} has quit{why}: its migration settings went with it")
        elif r.busy is not None:
            notes.append(f"{r.guest}'s migration settings left as kvmshell set them: its migration is still {r.busy}")
        elif r.failed is not None:
            notes.append(f"could not put back {r.guest}'s migration settings ({r.failed})")
    return notes
