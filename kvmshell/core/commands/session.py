"""A session: the fleet, the current guest, the registry, and the executor of command lines.

``plan`` turns a line into what will run where without sending anything (so a rejected line never
reaches a guest); ``run_line`` executes the plan, concurrently for ``@all``, and returns one
``Outcome`` per target. Both faces (shell and TUI) and the non-interactive modes use this.
"""

from __future__ import annotations

import asyncio
import difflib
import logging
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from kvmshell.config import Config
from kvmshell.core.commands.results import Outcome, Result, Text
from kvmshell.core.commands.spec import Parsed, Registry, Scope, UsageError, split_words
from kvmshell.core.monitor.fleet import Fleet
from kvmshell.core.monitor.guestdata import GuestData
from kvmshell.core.migration.live.job import MigrationJob
from kvmshell.core.monitor.base import Monitor
from kvmshell.core.values.address import Kind
from kvmshell.errors import KvmError, Refused, Unsupported

log = logging.getLogger(__name__)

Confirmer = Callable[[str], Awaitable[bool]]
Editor = Callable[[str], Awaitable[str]]
Progress = Callable[[str, str], None]          # (guest, message)

# what would change a libvirt guest behind libvirt's back (its migrations, its process): refused
# (`migrate` goes through libvirt: commands/libvirt_migrate.py)
NOT_THROUGH_LIBVIRT = frozenset({
    "migrate_incoming", "migrate_recover", "migrate_pause",
    "loadvm-on", "quit"})
_TARGET_RE = re.compile(r"^@(\S*)\s*(.*)$", re.S)
HISTORY_KEEP = 1000        # recent lines kept in Session.history: a session that runs for weeks must not grow


@dataclass(frozen=True)
class Plan:
    """What a line will do: a spec with parsed values, or raw HMP passed through, on these guests."""

    targets: tuple[str, ...]         # empty for shell commands
    parsed: Parsed | None
    passthrough: str | None = None   # an HMP line kvmshell has no spec for


@dataclass
class Invocation:
    """One command running on one guest (or in the shell): what handlers receive."""

    session: Session
    guest: str | None
    parsed: Parsed

    @property
    def values(self) -> dict[str, object]:
        return self.parsed.values

    @property
    def flags(self) -> dict[str, object]:
        return self.parsed.flags

    @property
    def monitor(self) -> Monitor:
        assert self.guest is not None
        return self.session.fleet.monitor(self.guest)

    def progress(self, message: str) -> None:
        self.session.progress(self.guest or "", message)

    async def edit(self, text: str) -> str:
        """Let the user edit ``text`` (the shell and the TUI open $EDITOR); the edited text."""
        if self.session.editor is None:
            raise UsageError("editing needs a terminal: run it in `kvmshell shell` or `kvmshell tui`, or drop --edit",
                             guest=self.guest)
        return await self.session.editor(text)

    async def confirm(self, question: str) -> None:
        """Ask the user; raise Refused unless they agree (or -y/--yes was given)."""
        if self.session.assume_yes or self.parsed.flags.get("yes"):
            return
        if self.session.confirmer is None:
            raise Refused(f"{question} - not confirmed (run with -y/--yes to confirm)", guest=self.guest)
        if not await self.session.confirmer(f"{self.guest}: {question}" if self.guest else question):
            raise Refused("cancelled, nothing was done", guest=self.guest)


class Session:
    def __init__(self, fleet: Fleet, registry: Registry, config: Config | None = None, *,
                 confirmer: Confirmer | None = None, assume_yes: bool = False,
                 progress: Progress | None = None, current: str | None = None) -> None:
        self.fleet = fleet
        self.registry = registry
        self.config = config or Config()
        self.confirmer = confirmer
        self.editor: Editor | None = None      # opens a text in the user's editor (shell, TUI)
        self.assume_yes = assume_yes
        self.progress_sink = progress
        self.current = current
        self.data = GuestData(fleet)
        self.history: list[str] = []
        self.migrations: dict[str, MigrationJob] = {}     # by source guest: running or the last one
        self._job_tasks: set[asyncio.Task[object]] = set()

    def progress(self, guest: str, message: str) -> None:
        if self.progress_sink is not None:
            self.progress_sink(guest, message)

    # -- planning (pure: nothing is sent) ----------------------------------------------------
    def plan(self, line: str) -> Plan | None:
        """None for a blank line or a comment; UsageError/KvmError for a line that cannot run."""
        text = line.strip()
        if not text or text.startswith("#"):
            return None
        targets: tuple[str, ...] | None = None
        m = _TARGET_RE.match(text)
        if m:
            name, text = m.group(1), m.group(2).strip()
            if not name:
                raise UsageError("'@' needs a guest name or 'all', e.g. @vm1 info status")
            if name == "all":
                targets = tuple(self.fleet.names)
                if not targets:
                    raise KvmError("no guests attached", title="unknown guest")
            else:
                self.fleet.get(name)               # unknown guest: says so and lists the names
                targets = (name,)
            if not text:
                raise UsageError(f"@{name} needs a command, e.g. @{name} info status")
        words = split_words(text)
        spec, used = self.registry.lookup(words)
        if spec is None:
            if words and words[0] in ("info",) and len(words) == 1:
                subs = ", ".join(s.name.split(" ", 1)[1] for s in self.registry.subcommands("info"))
                raise UsageError(f"info needs a subcommand: {subs}")
            known = set().union(*(g.monitor.features.hmp_commands for g in self.fleet if g.monitor))
            if known and words[0] not in known:
                raise UsageError(self.unknown_command_message(words[0]))
            return Plan(self._targets(targets, words[0]), None, passthrough=text)
        rest = _after_words(text, used)
        parsed = self.registry.parse(spec, words[used:], rest)
        parsed = Parsed(parsed.spec, parsed.values, parsed.flags, text)
        if spec.scope is Scope.SHELL:
            if m is not None:
                raise UsageError(f"{spec.name} is a kvmshell command, not a guest command: drop the @target")
            return Plan((), parsed)
        return Plan(self._targets(targets, spec.name), parsed)

    def _targets(self, targets: tuple[str, ...] | None, command: str) -> tuple[str, ...]:
        if targets is not None:
            return targets
        if self.current is not None:
            return (self.current,)
        if len(self.fleet) == 1:
            return (self.fleet.names[0],)
        if not len(self.fleet):
            raise KvmError("no guests attached: start kvmshell with --guest NAME=ADDR", title="no guest")
        raise KvmError(f"{command}: which guest? `use NAME` or prefix the command with @NAME "
                       f"(guests: {', '.join(self.fleet.names)})", title="no guest")

    # -- running -----------------------------------------------------------------------------
    async def run_line(self, line: str) -> list[Outcome]:
        try:
            plan = self.plan(line)
        except KvmError as e:
            return [Outcome(None, error=str(e), error_title=e.title)]
        if plan is None:
            return []
        self.history.append(line.strip())
        if len(self.history) > 2 * HISTORY_KEEP:
            del self.history[:-HISTORY_KEEP]
        if not plan.targets:
            assert plan.parsed is not None
            return [await self._run_one(None, plan)]
        outcomes = await asyncio.gather(*(self._run_one(g, plan) for g in plan.targets))
        return list(outcomes)

    async def _run_one(self, guest: str | None, plan: Plan) -> Outcome:
        try:
            if plan.passthrough is not None:
                assert guest is not None
                result: Result = await self._passthrough(guest, plan.passthrough)
            else:
                assert plan.parsed is not None
                if guest is not None and plan.parsed.spec.name in NOT_THROUGH_LIBVIRT and \
                        self.fleet.get(guest).address.kind is Kind.DOMAIN:
                    raise Unsupported(f"{plan.parsed.spec.name}: libvirt manages this guest and kvmshell does not "
                                      "do that through libvirt yet (use virsh: migrate, destroy...); nothing "
                                      "was changed", guest=guest)
                result = await plan.parsed.spec.handler(Invocation(self, guest, plan.parsed))
            return Outcome(guest, result)
        except KvmError as e:
            msg = e.message if e.guest in (None, guest) else str(e)
            return Outcome(guest, error=msg, error_title=e.title)

    async def _passthrough(self, guest: str, line: str) -> Result:
        """A line kvmshell has no spec for: raw HMP, if the guest's HMP knows the command."""
        word = line.split(None, 1)[0]
        mon = self.fleet.monitor(guest)
        if not mon.features.has_hmp(word):
            raise UsageError(self.unknown_command_message(word, mon), guest=guest)
        return Text(await mon.hmp(line, timeout=60))

    def unknown_command_message(self, word: str, mon: Monitor | None = None) -> str:
        names = set(self.registry.names())
        if mon is not None:
            names |= mon.features.hmp_commands
        close = difflib.get_close_matches(word, sorted(names), n=1, cutoff=0.6)
        hint = f" - did you mean {close[0]!r}?" if close else " - `help` lists the commands"
        return f"unknown command {word!r}{hint}"

    # -- migrations kvmshell runs or follows ----------------------------------------------------
    def running_job(self, guest: str) -> MigrationJob | None:
        job = self.migrations.get(guest)
        return job if job is not None and job.outcome is None else None

    def launch(self, job: MigrationJob) -> None:
        """Follow ``job`` in the background (owned here, cancelled at close)."""
        self.migrations[job.req.source] = job
        task = asyncio.create_task(job.run(), name=f"migration-{job.req.source}")
        self._job_tasks.add(task)
        task.add_done_callback(self._job_done)

    def _job_done(self, task: asyncio.Task[object]) -> None:
        self._job_tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("migration job failed", exc_info=task.exception())

    async def aclose(self) -> None:
        for task in list(self._job_tasks):
            task.cancel()
        await asyncio.gather(*self._job_tasks, return_exceptions=True)
        await self.data.aclose()


def _after_words(text: str, count: int) -> str:
    """``text`` without its first ``count`` whitespace-separated words."""
    parts = text.split(None, count)
    return parts[count] if len(parts) > count else ""


__all__ = ["Invocation", "Plan", "Session"]
