"""Load: 100 guests attached in one session: `@all`, events, 10 concurrent migrations, the dashboard idle.

The guests are boot-sector lab guests on QMP unix sockets, under KVM when /dev/kvm works (else TCG):
all but MIGRATIONS of them idle (no working set: ``hlt`` with interrupts off, the lightest the lab has),
MIGRATIONS that dirty a 4 MiB working set (the migration sources). One idle guest's memory is measured
first (its QEMU's VmRSS) and the count is capped at what a quarter of the machine's available memory
holds (the machine is shared), which is said.

Measured, in this order:
1. The shell face: ``kvmshell --config FILE -c "@all info status"`` as a subprocess: exit status,
   guests that answered, wall time.
2. The dashboard: ``kvmshell --config FILE tui`` in a 120x40 pty, attached to all the guests, idle for
   TUI_SECONDS: its own CPU time (utime + stime from /proc) as a percentage of one core. Target < 10 %.
   (QEMU serves one client per monitor: the faces run before this process attaches.)
3. ``@all info status`` in one in-process session, ROUNDS times: every guest answers, time taken.
4. Events: ``@all stop`` then ``@all cont``, ROUNDS times: the STOP and RESUME events received per
   guest against those expected (one each per round and guest); none may be missing.
5. MIGRATIONS concurrent migrations (``@srcN migrate --to dstN --strategy auto``, all lines at once) to
   fresh ``-incoming`` destinations attached for it: each finishes completed, each destination's
   working set is checked; the process's CPU over them (no dashboard) is the baseline for 6.
6. The dashboard in this process (the textual app, headless, 120x40, over the same session): its CPU
   idle for DASH_IDLE s, then MIGRATIONS more concurrent migrations typed as command-bar lines
   (``@dstN migrate --to backN``; every other ``backN`` on HMP): the process's CPU over them against
   5's, how often each migrating guest's row in the list changed (the longest gap while it migrated,
   and from its finish event to its row saying so), the selected guest's pane likewise; then QUITS
   idle guests (half on HMP) are quit from the bar: each leaves the list's reachable guests, a SHUTDOWN
   event from each QMP one. Every event the fleet delivered while the dashboard ran (MIGRATION,
   SHUTDOWN, kvmshell's own) must have reached the app as a message: none dropped.

HMP: HMP guests of the idle ones (every ``guests / HMP``-th) are attached over an HMP unix socket,
so both monitor backends are under load; they send no events, so their stop/cont is checked by
their state (``@all info status`` after each ``@all stop`` / ``@all cont``).

    nice -n 5 .venv/bin/python bench/load.py [--guests 100] [--migrations 10] [--tui-seconds 30]
                                             [--hmp 20] [--quits 4] [--bandwidth 16M]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from kvmshell.core.commands.registry import default_registry
from kvmshell.core.commands.session import Session
from kvmshell.core.migration.live.job import FINISHED
from kvmshell.core.monitor.fleet import Fleet
from kvmshell.core.values.models import Event
from kvmshell.lab.launcher import Lab, LabGuest, MonitorKind
from kvmshell.lab.verify import check_guest_memory
from kvmshell.tui.app import KvmshellApp
from kvmshell.tui.history import History
from kvmshell.tui.messages import CommandFinished, GuestEvent
from kvmshell.tui.source import SessionSource
from kvmshell.tui.views import GuestRow

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(BENCH))
from bench_tui import Tui, measure_cpu  # noqa: E402

WS_PAGES = 1024               # 4 MiB working set on the migration sources
PACE = 1                      # ~4 MB/s dirtied
IDLE_RAM_MIB = 32
SRC_RAM_MIB = 32
SHARE_OF_MEMORY = 0.25        # the machine is shared: use at most this much of MemAvailable
DASH_IDLE = 10.0              # seconds the in-process dashboard is measured idle
PANE_GAP = 2.0                # a migrating guest's row must change at least this often (s)


def qemu_rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def mem_available_kib() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1])
    return 0


@dataclass
class LoadResult:
    guests: int
    accel: str
    guest_rss_mib: float = 0.0
    fits: int = 0
    start_s: float = 0.0
    at_all_s: list[float] = field(default_factory=list)
    at_all_answered: list[int] = field(default_factory=list)
    events_expected: dict[str, int] = field(default_factory=dict)
    events_received: dict[str, int] = field(default_factory=dict)
    events_missing_guests: list[str] = field(default_factory=list)
    shell_exit: int | None = None
    shell_answered: int = 0
    shell_s: float = 0.0
    tui_cpu_percent: float | None = None
    tui_start_s: float | None = None
    tui_unreachable: int | None = None
    migrations: int = 0
    migrations_s: float = 0.0
    migration_status: dict[str, str] = field(default_factory=dict)
    migration_memcheck: dict[str, str] = field(default_factory=dict)
    unattached: list[str] = field(default_factory=list)
    hmp_guests: int = 0
    hmp_state_expected: int = 0             # HMP guests x stop/cont rounds x 2
    hmp_state_ok: int = 0                   # ... that showed the state expected
    migrations_cpu_percent: float | None = None    # the process over the migrations of 5 (no dashboard)
    migrations_cpu_s: float | None = None
    load1: list[float] = field(default_factory=list)   # the machine's load average at each step
    dash: DashResult | None = None

    @property
    def ok(self) -> bool:
        return (all(a == self.guests for a in self.at_all_answered) and self.events_received == self.events_expected
                and (self.shell_exit in (None, 0)) and set(self.migration_status.values()) <= {"completed"}
                and set(self.migration_memcheck.values()) <= {"ok"} and not self.unattached
                and self.hmp_state_ok == self.hmp_state_expected
                and (self.tui_cpu_percent is None or (self.tui_cpu_percent < 10 and self.tui_unreachable == 0))
                and (self.dash is None or self.dash.ok))


@dataclass
class DashResult:
    """Step 6: the dashboard in this process while migrations run."""
    gap_limit_s: float = PANE_GAP
    idle_cpu_percent: float = 0.0
    idle_s: float = 0.0
    migrations: int = 0
    migrations_s: float = 0.0
    cpu_percent: float = 0.0                # the process over the migrations, dashboard attached
    migration_status: dict[str, str] = field(default_factory=dict)
    migration_memcheck: dict[str, str] = field(default_factory=dict)
    commands_s: float = 0.0                 # from the lines typed to the last one's outcome in the app
    command_errors: dict[str, str] = field(default_factory=dict)   # guest -> the error its migrate line gave
    dests_unattached: list[str] = field(default_factory=list)      # destinations not attached after 60 s
    dests_first_failed: dict[str, str] = field(default_factory=dict)  # destination -> why its first connect failed
    cpu_s: float = 0.0
    idle_cpu_s: float = 0.0
    row_first_s: dict[str, float | None] = field(default_factory=dict)   # lines typed -> the row shows it under way
    row_updates: dict[str, int] = field(default_factory=dict)      # changes of each migrating guest's row
    row_max_gap_s: dict[str, float] = field(default_factory=dict)  # longest time without one, under way -> outcome
    row_final_lag_s: dict[str, float] = field(default_factory=dict)  # QEMU's MIGRATION completed -> its row says so
    timeline: list[tuple[float, str]] = field(default_factory=list)   # the pane guest's row: (s from start, badge)
    pane_guest: str = ""
    pane_updates: int = 0
    pane_max_gap_s: float = 0.0
    migration_events: dict[str, list[str]] = field(default_factory=dict)   # source -> MIGRATION statuses
    quit: list[str] = field(default_factory=list)
    shutdown_events: dict[str, int] = field(default_factory=dict)          # QMP guests quit -> SHUTDOWN seen
    shown_gone: list[str] = field(default_factory=list)
    fleet_events: int = 0                   # delivered by the fleet while the dashboard ran
    app_events: int = 0                     # ... that reached the app as GuestEvent messages
    dropped: dict[str, int] = field(default_factory=dict)                  # "guest NAME" -> missing

    @property
    def ok(self) -> bool:
        return (set(self.migration_status.values()) == {"completed"} and len(self.migration_status) == self.migrations
                and set(self.migration_memcheck.values()) <= {"ok"} and not self.dropped and not self.dests_unattached
                and all(g <= self.gap_limit_s for g in self.row_max_gap_s.values())
                and all("completed" in v for v in self.migration_events.values())
                and all(n == 1 for n in self.shutdown_events.values()) and sorted(self.shown_gone) == sorted(self.quit))


async def measure_guest_memory(lab: Lab) -> float:
    """VmRSS (MiB) of idle guests once booted: the mean of three."""
    guests = await asyncio.gather(*(lab.start(f"probe{i}", MonitorKind.QMP_UNIX, ws_pages=0, ram_mib=IDLE_RAM_MIB)
                                    for i in range(3)))
    rss = statistics.fmean(qemu_rss_kib(g.pid) for g in guests) / 1024
    for g in guests:
        await g.kill()
        del lab.guests[g.name]
    return rss


def hmp_indices(idle: int, hmp: int) -> set[int]:
    """Which of the idle guests (by number) attach over HMP: ``hmp`` of them, spread out."""
    hmp = min(hmp, idle)
    return {i * idle // hmp for i in range(hmp)} if hmp else set()


async def start_guests(lab: Lab, count: int, sources: int, settle: bool = True, hmp: int = 0) -> list[LabGuest]:
    """The sources, then the idle guests in tens (``hmp`` of them on HMP); return once the sources have
    booted (their working set is set up) and, with ``settle``, every idle guest too (firmware keeps the
    CPUs busy for seconds: not while measuring)."""
    srcs = list(await asyncio.gather(*(
        lab.start(f"src{i}", MonitorKind.QMP_UNIX, ws_pages=WS_PAGES, pace=PACE, ram_mib=SRC_RAM_MIB, wait_banner=False)
        for i in range(sources))))
    guests = list(srcs)
    on_hmp = hmp_indices(count - sources, hmp)
    for base in range(0, count - sources, 10):
        batch = [lab.start(f"g{n:03d}", MonitorKind.HMP_UNIX if n in on_hmp else MonitorKind.QMP_UNIX, ws_pages=0,
                           ram_mib=IDLE_RAM_MIB, wait_banner=False)
                 for n in range(base, min(count - sources, base + 10))]
        guests += await asyncio.gather(*batch)
    async with asyncio.timeout(600):          # a loaded machine boots many guests slowly
        await asyncio.gather(*(g.banner.wait() for g in (guests if settle else srcs)))
    return guests


def write_config(path: Path, guests: list[LabGuest]) -> None:
    path.write_text("".join(f'[guests.{g.name}]\nmonitor = "{g.address}"\n\n' for g in guests))


async def hmp_states(session: Session, names: list[str], state: str) -> int:
    """How many of the (HMP) guests ``names`` say ``state`` in ``info status``."""
    said = await asyncio.gather(*(session.run_line(f"@{n} info status") for n in names))
    return sum(o.ok and o.result is not None and f"VM status: {state}" in o.result.text() for [o] in said)


async def events_round(session: Session, counts: Counter[tuple[str, str]], names: list[str],
                       command: str, event: str, rounds_done: int, timeout: float = 30) -> None:
    """Run ``@all command`` and wait (bounded) for one more ``event`` from every guest of ``names``
    (the QMP ones: HMP sends no events)."""
    for o in await session.run_line(f"@all {command}"):
        if not o.ok:
            raise RuntimeError(f"@{o.guest} {command}: {o.error}")
    try:
        async with asyncio.timeout(timeout):
            while any(counts[(n, event)] < rounds_done + 1 for n in names):
                await asyncio.sleep(0.05)
    except TimeoutError:
        pass                                # the missing ones are counted, not waited for forever


async def shell_face(kvmshell: str, config: Path, env: dict[str, str], expected: int) -> tuple[int, int, float]:
    t0 = time.perf_counter()
    proc = await asyncio.create_subprocess_exec(kvmshell, "--config", str(config), "-c", "@all info status",
                                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    async with asyncio.timeout(120):
        out, err = await proc.communicate()
    took = time.perf_counter() - t0
    answered = len(re.findall(r"VM status: running", out.decode(errors="replace")))
    if proc.returncode or answered != expected:
        print(f"shell face: exit {proc.returncode}, {answered} answered; stderr: {err.decode()[-500:]}", flush=True)
    return int(proc.returncode or 0), answered, took


async def tui_face(kvmshell: str, config: Path, env: dict[str, str], count: int,
                   seconds: float) -> tuple[float, float, int]:
    """The dashboard's idle CPU (% of one core), when it listed the guests, and how many its title says
    are unreachable at the end of the window."""
    tui = Tui([kvmshell, "--config", str(config), "tui"], env)
    tui.start()
    try:
        t0 = time.perf_counter()
        await tui.wait_for(f"guests {count}".encode(), timeout=180)
        started = time.perf_counter() - t0
        await asyncio.sleep(3)              # the first polls and data fetches settle before the window
        cpu = await measure_cpu(tui, seconds)
        titles = re.findall(rb"guests %d(?:, (\d+) unreachable)?" % count, bytes(tui.text))
        down = int(titles[-1] or 0) if titles else -1
        return cpu, started, down
    finally:
        await tui.stop()


async def load(count: int = 100, migrations: int = 10, rounds: int = 3, tui_seconds: float = 30.0,
               shell: bool = True, say: bool = True, settle: bool = True, hmp: int = 0,
               dash: bool = True, quits: int = 4, bandwidth: str = "", dash_idle: float = DASH_IDLE,
               pane_gap: float = PANE_GAP) -> LoadResult:
    """The whole load run (see the module's docstring). ``settle`` false (the short test): no memory
    probe, and no wait for the idle guests' firmware before measuring. ``bandwidth`` (e.g. "16M") caps
    every migration (longer ones give the dashboard more to show)."""
    loads: list[float] = []

    def note(text: str) -> None:
        loads.append(round(os.getloadavg()[0], 1))
        if say:
            print(f"[load {loads[-1]}] {text}", flush=True)

    kvmshell = shutil.which("kvmshell", path=str(ROOT / ".venv" / "bin")) or "kvmshell"
    state = Path(tempfile.mkdtemp(prefix="kvmshell-bench-load-"))
    env = {**os.environ, "TERM": "xterm-256color", "XDG_STATE_HOME": str(state),
           "LINES": "40", "COLUMNS": "120"}
    try:
        async with Lab() as lab:
            res = LoadResult(count, lab.accel)
            if settle:
                res.guest_rss_mib = round(await measure_guest_memory(lab), 1)
                res.fits = int(mem_available_kib() / 1024 * SHARE_OF_MEMORY / res.guest_rss_mib)
                note(f"one idle guest: {res.guest_rss_mib} MiB RSS ({lab.accel}); a quarter of the available "
                     f"memory holds {res.fits}")
                if res.fits < count:
                    note(f"running {res.fits} guests instead of {count}")
                    res.guests = count = res.fits
            t0 = time.perf_counter()
            guests = await start_guests(lab, count, migrations, settle, hmp)
            on_hmp = [g.name for g in guests if g.address.protocol.value == "hmp"]
            res.hmp_guests = len(on_hmp)
            res.start_s = round(time.perf_counter() - t0, 1)
            note(f"{len(guests)} guests booted in {res.start_s} s")
            config = state / "config.toml"
            write_config(config, guests)
            # the faces first: QEMU serves one client per monitor, so each face attaches while no other does
            if shell:
                res.shell_exit, res.shell_answered, took = await shell_face(kvmshell, config, env, count)
                res.shell_s = round(took, 2)
                note(f"kvmshell -c '@all info status': exit {res.shell_exit}, {res.shell_answered}/{count} "
                     f"running, {res.shell_s} s")
            if tui_seconds > 0:
                cpu, started, down = await tui_face(kvmshell, config, env, count, tui_seconds)
                res.tui_cpu_percent, res.tui_start_s, res.tui_unreachable = round(cpu, 2), round(started, 1), down
                note(f"tui: {count} guests listed after {res.tui_start_s} s ({down} unreachable at the end); idle "
                     f"{res.tui_cpu_percent} % of one core over {tui_seconds:.0f} s")
            counts: Counter[tuple[str, str]] = Counter()
            finished: dict[str, Event] = {}
            finished_at: dict[str, float] = {}
            migration_statuses: dict[str, list[str]] = {}

            def on_event(ev: Event) -> None:
                counts[(ev.guest, ev.name)] += 1
                if ev.name == FINISHED:
                    finished[ev.guest] = ev
                elif ev.name == "MIGRATION":
                    migration_statuses.setdefault(ev.guest, []).append(str(ev.data.get("status")))
                    if ev.data.get("status") == "completed":
                        finished_at[ev.guest] = time.perf_counter()

            async with Fleet() as fleet:
                for g in guests:
                    fleet.add(g.name, g.address)
                fleet.subscribe(on_event)
                await fleet.start()
                res.unattached = [g.name for g in fleet if g.monitor is None or not g.monitor.connected]
                session = Session(fleet, default_registry(), assume_yes=True)
                try:
                    names = [g.name for g in guests if g.name not in on_hmp]     # HMP sends no events
                    for _ in range(rounds):
                        t0 = time.perf_counter()
                        outcomes = await session.run_line("@all info status")
                        res.at_all_s.append(round(time.perf_counter() - t0, 3))
                        res.at_all_answered.append(sum(o.ok and "running" in o.result.text()
                                                       for o in outcomes if o.result is not None))
                    note(f"@all info status: {res.at_all_answered} answered, {res.at_all_s} s")
                    for r in range(rounds):
                        await events_round(session, counts, names, "stop", "STOP", r)
                        res.hmp_state_ok += await hmp_states(session, on_hmp, "paused")
                        await events_round(session, counts, names, "cont", "RESUME", r)
                        res.hmp_state_ok += await hmp_states(session, on_hmp, "running")
                    res.hmp_state_expected = 2 * rounds * len(on_hmp)
                    res.events_expected = {"STOP": rounds * len(names), "RESUME": rounds * len(names)}
                    res.events_received = {e: sum(counts[(n, e)] for n in names) for e in ("STOP", "RESUME")}
                    res.events_missing_guests = sorted({n for n in names for e in ("STOP", "RESUME")
                                                        if counts[(n, e)] != rounds})
                    note(f"events: expected {res.events_expected}, received {res.events_received}"
                         f"{'; guests off: ' + ', '.join(res.events_missing_guests) if res.events_missing_guests else ''}"
                         f"; HMP guests ({len(on_hmp)}) in the state expected after stop/cont: "
                         f"{res.hmp_state_ok}/{res.hmp_state_expected}")
                    flags = f"--bandwidth {bandwidth}" if bandwidth else ""
                    if migrations:
                        await migrate_all(lab, session, res, migrations, finished, flags)
                        note(f"{migrations} concurrent migrations in {res.migrations_s} s: "
                             f"{dict(Counter(res.migration_status.values()))}, memory "
                             f"{dict(Counter(res.migration_memcheck.values()))}; this process's CPU over them "
                             f"{res.migrations_cpu_percent} % of a core ({res.migrations_cpu_s} s)")
                    if dash:
                        idle_qmp = [n for n in names if n.startswith("g")]
                        quit_names = on_hmp[:quits // 2] + idle_qmp[:quits - min(quits // 2, len(on_hmp))]
                        res.dash = await dashboard(lab, session, res, migrations, finished, finished_at,
                                                   migration_statuses, flags, quit_names, counts, dash_idle)
                        res.dash.gap_limit_s = pane_gap
                        note(dash_lines(res.dash))
                    res.load1 = loads
                finally:
                    await session.aclose()
            return res
    finally:
        shutil.rmtree(state, ignore_errors=True)


def dash_lines(d: DashResult) -> str:
    gaps = list(d.row_max_gap_s.values())
    lags = list(d.row_final_lag_s.values())
    return "\n".join([
        f"dashboard (in this process): idle {d.idle_cpu_percent} % of a core ({d.idle_cpu_s} s CPU) over {d.idle_s:.0f} s",
        f"  {d.migrations} migrations from its command bar in {d.migrations_s} s (the lines done in the app after "
        f"{d.commands_s} s): {dict(Counter(d.migration_status.values()))}, memory "
        f"{dict(Counter(d.migration_memcheck.values()))}; this process's CPU over them {d.cpu_percent} % of a core "
        f"({d.cpu_s} s)",
        f"  migrating guests' rows: under way after {sorted(x for x in d.row_first_s.values() if x is not None)} s; "
        f"{min(d.row_updates.values(), default=0)}-{max(d.row_updates.values(), default=0)} "
        f"changes each, longest gap {max(gaps, default=0):.2f} s (limit {d.gap_limit_s} s), finish event -> row "
        f"{min(lags, default=0):.2f}-{max(lags, default=0):.2f} s (from QEMU's MIGRATION completed); the pane ({d.pane_guest}): {d.pane_updates} "
        f"changes, longest gap {d.pane_max_gap_s:.2f} s",
        f"  {d.pane_guest}'s row: {d.timeline}",
        f"  migrate lines that failed: {d.command_errors or 'none'}; destinations not attached: "
        f"{d.dests_unattached or 'none'}; first connect failed: {d.dests_first_failed or 'none'}",
        f"  MIGRATION events per source: {sorted({' '.join(v) for v in d.migration_events.values()})}",
        f"  quit {d.quit}: shown gone {d.shown_gone}, SHUTDOWN events (QMP ones) {d.shutdown_events}",
        f"  events while it ran: the fleet delivered {d.fleet_events}, the app got {d.app_events}; "
        f"dropped {d.dropped or 'none'}"])


@dataclass
class Batch:
    seconds: float = 0.0
    cpu_percent: float = 0.0              # this process's CPU over the batch, % of one core
    cpu_s: float = 0.0
    status: dict[str, str] = field(default_factory=dict)
    memcheck: dict[str, str] = field(default_factory=dict)
    t0: float = 0.0
    ended: float = 0.0


def cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system


async def new_dests(lab: Lab, session: Session, names: list[str], like: list[str],
                    hmp: set[str] = frozenset(), first_failed: dict[str, str] | None = None) -> list[str]:
    """Fresh ``-incoming`` QEMUs named ``names`` for the guests ``like`` (same disk), attached; those
    not attached after 60 s. ``first_failed`` gets the reason of each whose first attempt failed."""
    dests = await asyncio.gather(*(lab.start(n, MonitorKind.HMP_UNIX if n in hmp else MonitorKind.QMP_UNIX,
                                             ws_pages=WS_PAGES, ram_mib=SRC_RAM_MIB, incoming=True,
                                             disk=lab.guests[src].disk)
                                   for n, src in zip(names, like)))
    for d in dests:
        session.fleet.add(d.name, d.address)
    await session.fleet.wait_first_attempts(names)
    if first_failed is not None:
        first_failed.update({n: g.reason or "?" for n in names if (g := session.fleet.get(n)).reason is not None
                             and g.monitor is None})

    def unattached() -> list[str]:
        return [n for n in names if (m := session.fleet.get(n).monitor) is None or not m.connected]
    try:
        async with asyncio.timeout(60):          # on a loaded machine a first attempt can fail: the fleet retries
            while unattached():
                await asyncio.sleep(0.1)
    except TimeoutError:
        pass
    return unattached()


async def migrate_batch(lab: Lab, session: Session, pairs: list[tuple[str, str]], finished: dict[str, Event],
                        flags: str = "", app: KvmshellApp | None = None) -> Batch:
    """The migrations ``pairs`` (source, destination) started at once (in the session, or typed into
    ``app``'s command bar); wait for every finish event, then check each destination's working set."""
    b = Batch()
    for src, _ in pairs:
        finished.pop(src, None)
    lines = [f"@{src} migrate --to {dst} --strategy auto {flags}".strip() for src, dst in pairs]
    b.t0, cpu0 = time.perf_counter(), cpu_seconds()
    if app is not None:
        for line in lines:
            app.run_command(line)         # as the command bar does: the outcomes come back as messages
    else:
        for (src, _), [o] in zip(pairs, await asyncio.gather(*(session.run_line(line) for line in lines))):
            if not o.ok:
                b.status[src] = f"not started: {o.error}"
    try:
        async with asyncio.timeout(120):
            while any(src not in finished and src not in b.status for src, _ in pairs):
                await asyncio.sleep(0.05)
    except TimeoutError:
        pass
    b.ended, cpu1 = time.perf_counter(), cpu_seconds()
    b.seconds = round(b.ended - b.t0, 2)
    b.cpu_s = round(cpu1 - cpu0, 2)
    b.cpu_percent = round(100 * (cpu1 - cpu0) / max(b.seconds, 1e-3), 1)
    for src, dst in pairs:
        if src in finished:
            b.status[src] = str(finished[src].data["status"])
        b.status.setdefault(src, "no finish event in 120 s")
        if b.status[src] == "completed":
            await lab.guests[dst].wait_heartbeats(1)
            check = await check_guest_memory(session.fleet.monitor(dst), WS_PAGES, lab.workdir)
            b.memcheck[src] = "ok" if check.ok else f"FAILED: {check.summary()}"
    return b


async def migrate_all(lab: Lab, session: Session, res: LoadResult, migrations: int,
                      finished: dict[str, Event], flags: str = "") -> None:
    res.unattached += await new_dests(lab, session, [f"dst{i}" for i in range(migrations)],
                                      [f"src{i}" for i in range(migrations)])
    b = await migrate_batch(lab, session, [(f"src{i}", f"dst{i}") for i in range(migrations)], finished, flags)
    res.migrations, res.migrations_s, res.migrations_cpu_percent = migrations, b.seconds, b.cpu_percent
    res.migrations_cpu_s = b.cpu_s
    res.migration_status, res.migration_memcheck = b.status, b.memcheck


class Watched:
    """What the app's guest list and pane were given to show: each change of a watched guest's row, and
    of the pane's migration view, with its time."""

    def __init__(self, app: KvmshellApp, names: set[str]) -> None:
        self.names = names
        self.rows: dict[str, list[tuple[float, GuestRow]]] = {n: [] for n in names}
        self.last: dict[str, GuestRow] = {}
        self.pane: list[tuple[float, object]] = []
        gl, pane = app.guest_list, app.pane
        show_rows, show_pane = gl.show, pane.show

        def rows(rows: list[GuestRow]) -> None:
            now = time.perf_counter()
            for r in rows:
                if self.last.get(r.name) != r:
                    self.last[r.name] = r
                    if r.name in self.names:
                        self.rows[r.name].append((now, r))
            show_rows(rows)

        def pane_view(view: object) -> None:
            mv = getattr(view, "migration", None)
            if mv is not None and (not self.pane or self.pane[-1][1] != mv):
                self.pane.append((time.perf_counter(), mv))
            show_pane(view)

        gl.show = rows              # type: ignore[method-assign]
        pane.show = pane_view       # type: ignore[method-assign]

    def shown_at(self, name: str, done: Callable[[GuestRow], bool]) -> float | None:
        return next((t for t, r in self.rows[name] if done(r)), None)

    def span(self, name: str, after: float) -> tuple[float | None, float | None]:
        """When, after ``after``, ``name``'s row first showed a migration under way, and then its outcome."""
        rows = [(t, r) for t, r in self.rows[name] if t > after]
        first = next((t for t, r in rows if r.badge_text not in TERMINAL + ("idle", "incoming")), None)
        end = next((t for t, r in rows if t >= (first or after) and r.badge_text in TERMINAL), None)
        return first, end


def max_gap(times: list[float]) -> float:
    return max((b - a for a, b in zip(times, times[1:])), default=0.0)


TERMINAL = ("completed", "failed", "cancelled")


async def dashboard(lab: Lab, session: Session, res: LoadResult, migrations: int, finished: dict[str, Event],
                    finished_at: dict[str, float], migration_statuses: dict[str, list[str]], flags: str,
                    quits: list[str], counts: Counter[tuple[str, str]], idle: float = DASH_IDLE) -> DashResult:
    """Step 6 (see the module's docstring)."""
    d = DashResult(migrations=migrations)
    app = KvmshellApp(SessionSource(session, history=History()))
    reached: set[int] = set()
    delivered: list[Event] = []
    done_at: dict[str, float] = {}

    def hook(message: object) -> None:
        if isinstance(message, GuestEvent):
            reached.add(id(message.event))
        elif isinstance(message, CommandFinished) and " migrate " in message.line:
            done_at[message.line] = time.perf_counter()
            d.command_errors.update({o.guest or message.line: str(o.error) for o in message.outcomes if not o.ok})

    sources = [f"dst{i}" for i in range(migrations)]
    async with app.run_test(size=(120, 40), message_hook=hook) as pilot:
        watched = Watched(app, set(sources) | set(quits))
        async with asyncio.timeout(120):
            while len(watched.last) < len(session.fleet.names):
                await pilot.pause(0.1)
        unsubscribe = session.fleet.subscribe(delivered.append)
        try:
            await asyncio.sleep(min(3.0, idle))       # the first polls settle
            t0, cpu0 = time.perf_counter(), cpu_seconds()
            await asyncio.sleep(idle)
            d.idle_s = round(time.perf_counter() - t0, 1)
            d.idle_cpu_s = round(cpu_seconds() - cpu0, 2)
            d.idle_cpu_percent = round(100 * d.idle_cpu_s / d.idle_s, 1)
            if migrations:
                backs = [f"back{i}" for i in range(migrations)]
                d.dests_unattached = await new_dests(lab, session, backs, sources, first_failed=d.dests_first_failed,
                                                     hmp={b for i, b in enumerate(backs) if i % 2})
                d.pane_guest = sources[0]
                app.select(d.pane_guest)
                seen_before = {s: len(migration_statuses.get(s, [])) for s in sources}
                for s in sources:
                    finished_at.pop(s, None)
                b = await migrate_batch(lab, session, list(zip(sources, backs)), finished, flags, app)
                d.migrations_s, d.cpu_percent, d.cpu_s = b.seconds, b.cpu_percent, b.cpu_s
                d.migration_status, d.migration_memcheck = b.status, b.memcheck
                try:
                    async with asyncio.timeout(30):
                        while any(watched.span(s, b.t0)[1] is None for s in sources):
                            await asyncio.sleep(0.05)
                except TimeoutError:
                    pass
                d.commands_s = round(max(done_at.values(), default=b.t0) - b.t0, 2)
                for s in sources:
                    first, end = watched.span(s, b.t0)
                    end = end or time.perf_counter()
                    times = [first or b.t0] + [t for t, _ in watched.rows[s] if (first or b.t0) < t <= end]
                    d.row_first_s[s] = round(first - b.t0, 2) if first else None
                    d.row_updates[s] = len(times) - 1
                    d.row_max_gap_s[s] = round(max_gap(times), 2)
                    if s in finished_at:
                        d.row_final_lag_s[s] = round(end - finished_at[s], 2)
                    d.migration_events[s] = migration_statuses.get(s, [])[seen_before[s]:]
                d.timeline = [(round(t - b.t0, 2), r.badge_text) for t, r in watched.rows[d.pane_guest] if t > b.t0]
                pane_times = [b.t0] + [t for t, _ in watched.pane if t > b.t0]
                d.pane_updates, d.pane_max_gap_s = len(pane_times) - 1, round(max_gap(pane_times), 2)
            d.quit = list(quits)
            before = {q: counts[(q, "SHUTDOWN")] for q in quits}
            for q in quits:
                app.run_command(f"@{q} quit")
            try:
                async with asyncio.timeout(30):
                    while any(watched.shown_at(q, lambda r: not r.reachable) is None for q in quits):
                        await asyncio.sleep(0.05)
            except TimeoutError:
                pass
            d.shown_gone = [q for q in quits if watched.shown_at(q, lambda r: not r.reachable) is not None]
            d.shutdown_events = {q: counts[(q, "SHUTDOWN")] - before[q] for q in quits
                                 if session.fleet.get(q).address.protocol.value == "qmp"}
        finally:
            unsubscribe()
        await pilot.pause(0.5)                        # the last messages delivered
    d.fleet_events = len(delivered)
    d.app_events = sum(id(ev) in reached for ev in delivered)
    d.dropped = dict(Counter(f"guest {ev.guest}" for ev in delivered if id(ev) not in reached))
    return d


async def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--guests", type=int, default=100)
    ap.add_argument("--migrations", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=3, help="@all info status and stop/cont rounds")
    ap.add_argument("--tui-seconds", type=float, default=30.0, help="the dashboard's idle window (0: skip)")
    ap.add_argument("--hmp", type=int, default=20, help="idle guests attached over HMP (default 20)")
    ap.add_argument("--quits", type=int, default=4, help="idle guests quit under the dashboard (half HMP)")
    ap.add_argument("--bandwidth", default="16M", help="cap on every migration (default 16M; '' for none)")
    ap.add_argument("--no-dashboard", action="store_true", help="skip step 6")
    ap.add_argument("--out", default="bench/results-load.jsonl", help="the result appended here as a JSON line")
    args = ap.parse_args()
    print(f"machine: {platform.node()} {platform.machine()}, {os.cpu_count()} cpus, load {os.getloadavg()[0]:.2f}, "
          f"{mem_available_kib() // 1024} MiB available, Python {platform.python_version()}, "
          f"{time.strftime('%Y-%m-%d %H:%M %Z')}", flush=True)
    res = await load(args.guests, args.migrations, args.rounds, args.tui_seconds, hmp=args.hmp,
                     dash=not args.no_dashboard, quits=args.quits, bandwidth=args.bandwidth)
    with open(args.out, "a") as out:
        out.write(json.dumps({**asdict(res), "ok": res.ok, "date": time.strftime("%Y-%m-%d %H:%M")}) + "\n")
    print("all as expected" if res.ok else "NOT all as expected: see above")
    return 0 if res.ok else 1


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
