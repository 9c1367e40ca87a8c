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
   working set is checked.

    nice -n 5 .venv/bin/python bench/load.py [--guests 100] [--migrations 10] [--tui-seconds 30]
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
from dataclasses import asdict, dataclass, field
from pathlib import Path

from kvmshell.core.commands.registry import default_registry
from kvmshell.core.commands.session import Session
from kvmshell.core.migration.live.job import FINISHED
from kvmshell.core.monitor.fleet import Fleet
from kvmshell.core.values.models import Event
from kvmshell.lab.launcher import Lab, LabGuest, MonitorKind
from kvmshell.lab.verify import check_guest_memory

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(BENCH))
from bench_tui import Tui, measure_cpu  # noqa: E402

WS_PAGES = 1024               # 4 MiB working set on the migration sources
PACE = 1                      # ~4 MB/s dirtied
IDLE_RAM_MIB = 32
SRC_RAM_MIB = 32
SHARE_OF_MEMORY = 0.25        # the machine is shared: use at most this much of MemAvailable


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

    @property
    def ok(self) -> bool:
        return (all(a == self.guests for a in self.at_all_answered) and self.events_received == self.events_expected
                and (self.shell_exit in (None, 0)) and set(self.migration_status.values()) <= {"completed"}
                and set(self.migration_memcheck.values()) <= {"ok"} and not self.unattached
                and (self.tui_cpu_percent is None or (self.tui_cpu_percent < 10 and self.tui_unreachable == 0)))


async def measure_guest_memory(lab: Lab) -> float:
    """VmRSS (MiB) of idle guests once booted: the mean of three."""
    guests = await asyncio.gather(*(lab.start(f"probe{i}", MonitorKind.QMP_UNIX, ws_pages=0, ram_mib=IDLE_RAM_MIB)
                                    for i in range(3)))
    rss = statistics.fmean(qemu_rss_kib(g.pid) for g in guests) / 1024
    for g in guests:
        await g.kill()
        del lab.guests[g.name]
    return rss


async def start_guests(lab: Lab, count: int, sources: int, settle: bool = True) -> list[LabGuest]:
    """The sources, then the idle guests in tens; return once the sources have booted (their working
    set is set up) and, with ``settle``, every idle guest too (firmware keeps the CPUs busy for seconds:
    not while measuring)."""
    srcs = list(await asyncio.gather(*(
        lab.start(f"src{i}", MonitorKind.QMP_UNIX, ws_pages=WS_PAGES, pace=PACE, ram_mib=SRC_RAM_MIB, wait_banner=False)
        for i in range(sources))))
    guests = list(srcs)
    for base in range(0, count - sources, 10):
        batch = [lab.start(f"g{n:03d}", MonitorKind.QMP_UNIX, ws_pages=0, ram_mib=IDLE_RAM_MIB, wait_banner=False)
                 for n in range(base, min(count - sources, base + 10))]
        guests += await asyncio.gather(*batch)
    async with asyncio.timeout(600):          # a loaded machine boots many guests slowly
        await asyncio.gather(*(g.banner.wait() for g in (guests if settle else srcs)))
    return guests


def write_config(path: Path, guests: list[LabGuest]) -> None:
    path.write_text("".join(f'[guests.{g.name}]\nmonitor = "{g.address}"\n\n' for g in guests))


async def events_round(session: Session, counts: Counter[tuple[str, str]], names: list[str],
                       command: str, event: str, rounds_done: int, timeout: float = 30) -> None:
    """Run ``@all command`` and wait (bounded) for one more ``event`` from every guest."""
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
               shell: bool = True, say: bool = True, settle: bool = True) -> LoadResult:
    """The whole load run (see the module's docstring). ``settle`` false (the short test): no memory
    probe, and no wait for the idle guests' firmware before measuring."""
    def note(text: str) -> None:
        if say:
            print(text, flush=True)

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
            guests = await start_guests(lab, count, migrations, settle)
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

            def on_event(ev: Event) -> None:
                counts[(ev.guest, ev.name)] += 1
                if ev.name == FINISHED:
                    finished[ev.guest] = ev

            async with Fleet() as fleet:
                for g in guests:
                    fleet.add(g.name, g.address)
                fleet.subscribe(on_event)
                await fleet.start()
                res.unattached = [g.name for g in fleet if g.monitor is None or not g.monitor.connected]
                session = Session(fleet, default_registry(), assume_yes=True)
                try:
                    names = [g.name for g in guests]
                    for _ in range(rounds):
                        t0 = time.perf_counter()
                        outcomes = await session.run_line("@all info status")
                        res.at_all_s.append(round(time.perf_counter() - t0, 3))
                        res.at_all_answered.append(sum(o.ok and "running" in o.result.text()
                                                       for o in outcomes if o.result is not None))
                    note(f"@all info status: {res.at_all_answered} answered, {res.at_all_s} s")
                    for r in range(rounds):
                        await events_round(session, counts, names, "stop", "STOP", r)
                        await events_round(session, counts, names, "cont", "RESUME", r)
                    res.events_expected = {"STOP": rounds * count, "RESUME": rounds * count}
                    res.events_received = {e: sum(counts[(n, e)] for n in names) for e in ("STOP", "RESUME")}
                    res.events_missing_guests = sorted({n for n in names for e in ("STOP", "RESUME")
                                                        if counts[(n, e)] != rounds})
                    note(f"events: expected {res.events_expected}, received {res.events_received}"
                         f"{'; guests off: ' + ', '.join(res.events_missing_guests) if res.events_missing_guests else ''}")
                    if migrations:
                        await migrate_all(lab, session, res, migrations, finished)
                        note(f"{migrations} concurrent migrations in {res.migrations_s} s: "
                             f"{dict(Counter(res.migration_status.values()))}, memory "
                             f"{dict(Counter(res.migration_memcheck.values()))}")
                finally:
                    await session.aclose()
            return res
    finally:
        shutil.rmtree(state, ignore_errors=True)


async def migrate_all(lab: Lab, session: Session, res: LoadResult, migrations: int,
                      finished: dict[str, Event]) -> None:
    fleet = session.fleet
    dests = await asyncio.gather(*(lab.start(f"dst{i}", MonitorKind.QMP_UNIX, ws_pages=WS_PAGES, ram_mib=SRC_RAM_MIB,
                                             incoming=True, disk=lab.guests[f"src{i}"].disk)
                                   for i in range(migrations)))
    for d in dests:
        fleet.add(d.name, d.address)
    await fleet.wait_first_attempts([d.name for d in dests])
    t0 = time.perf_counter()
    started = await asyncio.gather(*(session.run_line(f"@src{i} migrate --to dst{i} --strategy auto")
                                     for i in range(migrations)))
    for i, [o] in enumerate(started):
        if not o.ok:
            res.migration_status[f"src{i}"] = f"not started: {o.error}"
    async with asyncio.timeout(120):
        while any(f"src{i}" not in finished and f"src{i}" not in res.migration_status for i in range(migrations)):
            await asyncio.sleep(0.05)
    res.migrations_s = round(time.perf_counter() - t0, 2)
    res.migrations = migrations
    for i in range(migrations):
        src = f"src{i}"
        if src in finished:
            res.migration_status[src] = str(finished[src].data["status"])
        if res.migration_status[src] == "completed":
            await lab.guests[f"dst{i}"].wait_heartbeats(1)
            check = await check_guest_memory(fleet.monitor(f"dst{i}"), WS_PAGES, lab.workdir)
            res.migration_memcheck[src] = "ok" if check.ok else f"FAILED: {check.summary()}"


async def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--guests", type=int, default=100)
    ap.add_argument("--migrations", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=3, help="@all info status and stop/cont rounds")
    ap.add_argument("--tui-seconds", type=float, default=30.0, help="the dashboard's idle window (0: skip)")
    ap.add_argument("--out", default="bench/results-load.jsonl", help="the result appended here as a JSON line")
    args = ap.parse_args()
    print(f"machine: {platform.node()} {platform.machine()}, {os.cpu_count()} cpus, load {os.getloadavg()[0]:.2f}, "
          f"{mem_available_kib() // 1024} MiB available, Python {platform.python_version()}, "
          f"{time.strftime('%Y-%m-%d %H:%M %Z')}", flush=True)
    res = await load(args.guests, args.migrations, args.rounds, args.tui_seconds)
    with open(args.out, "a") as out:
        out.write(json.dumps({**asdict(res), "ok": res.ok, "date": time.strftime("%Y-%m-%d %H:%M")}) + "\n")
    print("all as expected" if res.ok else "NOT all as expected: see above")
    return 0 if res.ok else 1


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
