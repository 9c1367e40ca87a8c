"""Following, without a prompt, the migrations a `-c`/`run` line started, to their end.

The job runs in the session exactly as in the shell (steering, stall watchdog, fault handling);
this module waits for it, writes its progress to stderr (a live line on a terminal, elsewhere a
line when the state changes and every few seconds), and turns its outcome into the line's result
and the exit status. ``--detach`` leaves a migration to QEMU at once; Ctrl-C stops following and
says what state the migration is in and how to cancel it."""

from __future__ import annotations

import asyncio
import contextlib
import shlex
import shutil
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, TextIO

from kvmshell.cli.common import Exit
from kvmshell.core.commands.results import Outcome, Result
from kvmshell.core.commands.session import Session
from kvmshell.core.migration.live.job import MigrationJob
from kvmshell.core.migration.live.request import MigrationOutcome
from kvmshell.core.migration.model.predict import Verdict
from kvmshell.core.values.models import MigrationInfo
from kvmshell.core.values.units import human_bytes
from kvmshell.errors import KvmError, Refused

PROGRESS_EVERY_S = 3.0          # without a terminal: a progress line at most this often (unless the state changes)
TICK_S = 0.25
ANSWER_S = 3.0                  # a monitor that does not answer when we stop is not waited for
CANCEL_S = 30.0                 # a migration kvmshell must cancel when it stops following: its undo


def exit_for(outcome: MigrationOutcome | None) -> Exit:
    if outcome is not None and outcome.ok:
        return Exit.OK
    if outcome is not None and outcome.status == "postcopy-paused":
        return Exit.POSTCOPY_PAUSED
    return Exit.FAILED


_SEVERITY = (Exit.OK, Exit.FAILED, Exit.USAGE, Exit.POSTCOPY_PAUSED, Exit.INTERRUPTED)


def worse(a: Exit, b: Exit) -> Exit:
    return max(a, b, key=_SEVERITY.index)


@dataclass(frozen=True)
class Followed(Result):
    """A migration followed to its end: the line's result in `-c`/`run`. ``detail`` (a migration that
    did not complete): what a script needs to see why and where the guest is (see ``Follower.detail``)."""

    outcome: MigrationOutcome
    detail: dict[str, Any] = field(default_factory=dict)

    def text(self) -> str:
        return self.outcome.full_message

    def to_json(self) -> Any:
        o = self.outcome
        doc = {"status": o.status, "message": o.message, "total_s": o.total_s, "downtime_ms": o.downtime_ms,
               "sent_bytes": o.bytes_sent, "decisions": list(o.decisions), "notes": list(o.notes)}
        return doc | {k: v for k, v in self.detail.items() if doc.get(k) is None}


def outcome_of(guest: str, outcome: MigrationOutcome | None, detail: dict[str, Any] | None = None) -> Outcome:
    if outcome is None:
        outcome = MigrationOutcome("failed", "kvmshell lost track of the migration (see the log)")
    result = Followed(outcome, detail or {})
    if outcome.ok:
        return Outcome(guest, result)
    return Outcome(guest, result, error=outcome.full_message, error_title=f"migration {outcome.status}")


class Progress:
    """Progress on stderr: on a terminal one live line rewritten in place; elsewhere a line when the
    state changes, and every PROGRESS_EVERY_S seconds while it does not."""

    def __init__(self, err: TextIO, *, every: float = PROGRESS_EVERY_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.err, self.every, self.clock = err, every, clock
        self.tty = _isatty(err)
        self._live = False
        self._last: dict[str, tuple[str, float]] = {}      # key -> (state, when) of its last line

    def say(self, text: str) -> None:
        """A line that stays (a decision, a start, a stop)."""
        self.clear()
        self.err.write(f"kvmshell: {text}\n")
        self.err.flush()

    def status(self, key: str, state: str, text: str) -> None:
        """Where ``key`` (a guest) stands; ``state`` changing is worth a line at once."""
        if self.tty:
            width = max(20, shutil.get_terminal_size().columns - 1)
            self.err.write("\r\x1b[K" + f"kvmshell: {text}"[:width])
            self.err.flush()
            self._live = True
            return
        now = self.clock()
        last = self._last.get(key)
        if last is not None and last[0] == state and now - last[1] < self.every:
            return
        self._last[key] = (state, now)
        self.say(text)

    def sink(self, guest: str, message: str) -> None:
        """The session's progress messages (a copy, a preflight, a probe)."""
        self.status(f"{guest}\0message", message.split(":", 1)[0], f"{guest}: {message}" if guest else message)

    def clear(self) -> None:
        if self._live:
            self.err.write("\r\x1b[K")
            self._live = False


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


@contextlib.contextmanager
def ctrl_c_sets(event: asyncio.Event) -> Iterator[asyncio.Event]:
    """While in the block, Ctrl-C (SIGINT) sets ``event`` instead of interrupting kvmshell."""
    loop = asyncio.get_running_loop()
    previous = signal.getsignal(signal.SIGINT)
    try:
        loop.add_signal_handler(signal.SIGINT, event.set)
    except (NotImplementedError, RuntimeError, ValueError):       # not the main thread: leave it
        yield event
        return
    try:
        yield event
    finally:
        loop.remove_signal_handler(signal.SIGINT)
        signal.signal(signal.SIGINT, previous)


def describe(job: MigrationJob) -> tuple[str, str]:
    """(state, one line) of where the job's migration stands."""
    last = job.sampler.ring.last
    if last is None:
        rows = [f"{k} {v}" for st in job.stages for k, v in st.lines()]
        return "starting", "; ".join(["starting", *rows])
    parts = [str(last.status)]
    if last.status.is_active:
        if last.pass_no <= 1 and last.total:
            parts.append(f"first pass {100 * (1 - last.remaining / last.total):.0f} % of RAM")
        else:
            parts.append(f"pass {last.pass_no}, {human_bytes(last.remaining)} dirty to send")
        parts.append(f"{human_bytes(last.transferred)} sent, {last.throughput / 1e6:.0f} MB/s")
        if last.cpu_throttle:
            parts.append(f"throttled {last.cpu_throttle} %")
        pred = job.prediction
        if pred is not None and pred.verdict is not Verdict.UNKNOWN:
            parts.append(f"model: {pred.verdict.value}")
        parts += [f"{k} {v}" for st in job.stages for k, v in st.lines()]
    return str(last.status), ", ".join(parts)


def needs_kvmshell(job: MigrationJob) -> str | None:
    """Why the migration cannot go on without kvmshell (its stages act at the start and the end:
    the disk copy completes at the switch-over, devices come back after), or None."""
    work = [st.name for st in job.work]
    return f"its stages ({', '.join(work)}) need kvmshell until the end" if work else None


def settings_left(job: MigrationJob) -> str:
    """The migration settings the job changed and that stay so when kvmshell stops following."""
    sides = []
    for name in (job.req.source, job.req.dest):
        if name is None:
            continue
        before = job.settings.before(name)
        changed = [f"{k} (was {_value(v)})" for k, v in [*before.capabilities.items(), *before.parameters.items()]]
        if changed:
            sides.append(f"on {name} {', '.join(changed)}")
    return "; ".join(sides)


def _value(v: object) -> str:
    return ("on" if v else "off") if isinstance(v, bool) else str(v)


class Follower:
    """Follows the jobs a line started; ``stop`` is set by Ctrl-C."""

    def __init__(self, session: Session, progress: Progress, stop: asyncio.Event) -> None:
        self.session, self.progress, self.stop = session, progress, stop
        self._said: dict[int, int] = {}                  # id(job) -> decisions already shown

    async def follow(self, jobs: dict[str, MigrationJob]) -> bool:
        """Until every job has ended (True) or Ctrl-C (False)."""
        waits = [asyncio.create_task(j.wait()) for j in jobs.values()]
        stop = asyncio.create_task(self.stop.wait())
        try:
            while True:
                self.tick(jobs)
                if all(t.done() for t in waits):
                    return True
                if stop.done():
                    return False
                await asyncio.wait({*waits, stop}, timeout=TICK_S, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in (*waits, stop):
                t.cancel()
            await asyncio.gather(*waits, stop, return_exceptions=True)
            self.progress.clear()

    def tick(self, jobs: dict[str, MigrationJob]) -> None:
        for guest, job in jobs.items():
            said = self._said.get(id(job), 0)
            for d in job.decisions[said:]:
                self.progress.say(f"{guest}: {d}")
            self._said[id(job)] = len(job.decisions)
            if job.outcome is None:
                state, text = describe(job)
                self.progress.status(guest, state, f"{guest}: {text}")

    def detach(self, jobs: dict[str, MigrationJob]) -> dict[str, MigrationJob]:
        """Leave each job's migration to QEMU, saying what that stops; the jobs that cannot be left."""
        kept: dict[str, MigrationJob] = {}
        for guest, job in jobs.items():
            why = needs_kvmshell(job)
            if why is not None:
                self.progress.say(f"{guest}: --detach: cannot leave this migration to QEMU, {why}; following it")
                kept[guest] = job
                continue
            self.progress.say(f"{guest}: --detach: the migration goes on in QEMU alone; "
                              + self._left(job, "stop as kvmshell exits")
                              + f"; {self.how_to('info migrate', guest)} shows it, "
                              f"{self.how_to('migrate_cancel', guest)} cancels it, `migrate --follow` takes it "
                              "back (with its strategy and undo)")
        return kept

    async def interrupted(self, jobs: dict[str, MigrationJob]) -> None:
        """Ctrl-C: say where each unfinished migration stands and how to stop it; cancel the ones that
        cannot go on without kvmshell."""
        for guest, job in jobs.items():
            if job.outcome is not None:
                continue
            why = needs_kvmshell(job)
            if why is not None:
                await self._cancel_for_good(guest, job, why)
                continue
            info = await self._info(guest)
            where = _where(info) if info is not None else "its state is unknown (no answer)"
            postcopy = info is not None and info.status.is_postcopy
            stop = (f"it cannot be cancelled (the guest runs on the destination already): "
                    f"{self.how_to('migrate_pause', guest)} pauses it for a recovery" if postcopy
                    else f"to cancel it: {self.how_to('migrate_cancel', guest)}")
            self.progress.say(f"{guest}: stopped following (Ctrl-C); the migration goes on in QEMU: {where}; "
                              f"{self._left(job, 'stop')}; {stop}; `migrate --follow` takes it back")

    @staticmethod
    def _left(job: MigrationJob, stop: str) -> str:
        """What ends with kvmshell's following (its steering only when the strategy steers)."""
        if not job.strategy.steers:
            return f"kvmshell's stall watchdog and its sampling {stop}"
        left = settings_left(job)
        tls = "; the TLS credentials (tls-creds) stay set on both sides" if job.req.tls is not None else ""
        return (f"kvmshell's steering (strategy {job.req.strategy}) and its stall watchdog {stop}"
                + (f"; migration settings left as kvmshell set them: {left}" if left else "") + tls)

    async def _cancel_for_good(self, guest: str, job: MigrationJob, why: str) -> None:
        try:
            await job.cancel()
        except Refused as e:
            self.progress.say(f"{guest}: stopped following (Ctrl-C); {e.message}; {why}")
            return
        except KvmError as e:
            self.progress.say(f"{guest}: stopped following (Ctrl-C); cancelling failed: {e.message}; {why}")
            return
        try:
            async with asyncio.timeout(CANCEL_S):
                outcome = await job.wait()
        except TimeoutError:
            self.progress.say(f"{guest}: Ctrl-C: cancelled, as {why}; its undo did not end within {CANCEL_S:g} s")
            return
        self.progress.say(f"{guest}: Ctrl-C: cancelled, as {why}: {outcome.full_message}")

    async def detail(self, job: MigrationJob) -> dict[str, Any]:
        """For a migration that did not complete: QEMU's own error (the source's error-desc), the state
        of each side now ("unreachable" when its monitor does not answer), and the time and bytes the
        samples saw when QEMU's outcome has none."""
        if job.outcome is None or job.outcome.ok:
            return {}
        info = await self._info(job.req.source)
        last = job.sampler.ring.last
        return {"qemu_error": info.error if info is not None else None,
                "source_state": await self._state(job.req.source),
                "dest_state": await self._state(job.req.dest) if job.req.dest else None,
                "total_s": round(last.t, 3) if last is not None else None,
                "sent_bytes": last.transferred if last is not None else None}

    async def _state(self, guest: str) -> str:
        try:
            async with asyncio.timeout(ANSWER_S):
                return str((await self.session.fleet.monitor(guest).status()).state)
        except (TimeoutError, KvmError):
            return "unreachable"

    async def _info(self, guest: str) -> MigrationInfo | None:
        try:
            async with asyncio.timeout(ANSWER_S):
                return await self.session.fleet.monitor(guest).migration()
        except (TimeoutError, KvmError):
            return None

    def how_to(self, command: str, guest: str) -> str:
        """The command line that runs ``command`` on ``guest`` from a shell."""
        address = self.session.fleet.get(guest).address
        return f"`kvmshell -g {shlex.quote(f'{guest}={address}')} -c '{command}'`"


def _where(info: MigrationInfo) -> str:
    ram = info.ram
    if ram is None or not info.status.is_active:
        return str(info.status)
    step = (f"first pass, {human_bytes(ram.remaining)} of {human_bytes(ram.total)} to send"
            if ram.dirty_sync_count <= 1 else f"pass {ram.dirty_sync_count}, {human_bytes(ram.remaining)} dirty")
    return f"{info.status}, {step}, {human_bytes(ram.transferred)} sent"
