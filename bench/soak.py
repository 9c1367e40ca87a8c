"""Soak: many live migrations back and forth in one kvmshell session, nothing lost, nothing growing.

Two names, ``a`` and ``b``, as a user with a config of two guests on shared storage would have them.
Each migration goes to a fresh ``-incoming defer`` QEMU started on the destination name's monitor
socket (a QEMU that has run cannot take an incoming migration again, so there is no ping-pong between
two processes): ``@a migrate --to b --strategy S``, the memory check on ``b``, ``@a quit``, and a new
``-incoming`` QEMU on ``a``'s socket, which the session reconnects to by itself; then back. The strategies
rotate (precopy, converge, postcopy, auto, auto+postcopy). Every 10th migration is cancelled while active
(the source runs on, its memory intact, its migration settings as before); every 25th (it wins over the
10th) the destination is killed (SIGKILL) while active (the source runs on, memory and settings too).

After each migration kvmshell's own RSS (VmRSS), open file descriptors and asyncio tasks are sampled;
the end judges their growth over the last 150 samples with a least-squares line (slope per migration,
growth over the window, and the noise: the residuals' standard deviation). Prints a row per migration
and writes JSON lines (one per migration, then a summary line).

What the RSS is made of is sampled too: the blocks Python's allocator holds (``sys.getallocatedblocks``)
and glibc's heap (``mallinfo2``: bytes in use, and the arena and mmapped bytes it holds from the
system). With ``--tracemalloc N`` the bench traces Python allocations (``--frames`` deep) and every N
migrations compares a snapshot with the previous one and with the first, by traceback, printing the 15
sites that grew most (and the traced bytes then go in every row).

    nice -n 5 .venv/bin/python bench/soak.py [--count 200] [--out bench/results-soak.jsonl]
                                             [--tracemalloc N [--frames 8]]
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import json
import os
import platform
import signal
import statistics
import sys
import time
import tracemalloc
from array import array
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from kvmshell.core.commands.registry import default_registry
from kvmshell.core.commands.session import Session
from kvmshell.core.migration.live.job import FINISHED
from kvmshell.core.monitor.base import Monitor
from kvmshell.core.monitor.fleet import Fleet
from kvmshell.core.values.models import Event, MigrationStatus, RunState
from kvmshell.lab.launcher import Lab, LabGuest, MonitorKind
from kvmshell.lab.verify import check_guest_memory

STRATEGIES = ("precopy", "converge", "postcopy", "auto", "auto+postcopy")
WS_PAGES = 4096               # 16 MiB working set
PACE = 2                      # ~8 MB/s dirtied
RAM_MIB = 64
WINDOW = 150                  # samples the growth is judged over
SLOW = "--bandwidth 2M"       # a migration that stays active long enough to cancel or break
POSTCOPY_CAP = "--bandwidth 20M"   # pass 1 takes about a second: postcopy starts after it, not never


def rss_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


class _Mallinfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                 "fsmblks", "uordblks", "fordblks", "keepcost")]


def _mallinfo2() -> Callable[[], _Mallinfo2] | None:
    try:
        fn = ctypes.CDLL(None).mallinfo2          # glibc 2.33+
    except (OSError, AttributeError):
        return None
    fn.restype = _Mallinfo2
    return fn


MALLINFO2 = _mallinfo2()


def heap_kib() -> tuple[int, int]:
    """glibc's heap (main arena only, plus mmapped chunks): the bytes in use, the bytes held from the
    system; (0, 0) without glibc."""
    if MALLINFO2 is None:
        return 0, 0
    m = MALLINFO2()
    return (m.uordblks + m.hblkhd) // 1024, (m.arena + m.hblkhd) // 1024


def traced_kib() -> int:
    return tracemalloc.get_traced_memory()[0] // 1024 if tracemalloc.is_tracing() else 0


@dataclass
class Row:
    n: int
    source: str
    dest: str
    kind: str                  # migrate | cancel | kill
    strategy: str
    status: str
    expected: str
    seconds: float
    postcopy: bool             # the job switched to postcopy
    memcheck: str
    settings: str              # after a cancel or kill: "as before" or what differs
    rss_kib: int
    fds: int
    tasks: int
    py_blocks: int = 0         # sys.getallocatedblocks()
    heap_used_kib: int = 0     # glibc mallinfo2: uordblks + hblkhd
    heap_kib: int = 0          # glibc mallinfo2: arena + hblkhd
    traced_kib: int = 0        # tracemalloc's traced bytes (with --tracemalloc)
    load1: float = 0.0         # the machine's 1-minute load average then

    @property
    def ok(self) -> bool:
        return self.status == self.expected and self.memcheck == "ok" and self.settings in ("as before", "-")


@dataclass
class Trend:
    name: str
    first: float
    last: float
    slope: float               # per migration
    growth: float              # slope x window
    noise: float               # residual standard deviation
    window: int
    grows: bool

    def line(self) -> str:
        return (f"{self.name}: {self.first:g} -> {self.last:g}; last {self.window}: slope {self.slope:+.4g}/migration "
                f"({self.growth:+.4g} over the window), noise {self.noise:.3g}: "
                f"{'GROWS' if self.grows else 'flat'}")


def trend(name: str, values: list[float], window: int = WINDOW, floor: float = 0.0) -> Trend:
    """Least-squares line over the last ``window`` values. It grows when the growth over the window
    is above both three times the noise and ``floor`` (what counts as noise for that measure)."""
    tail = values[-window:]
    n = len(tail)
    if n < 2:
        return Trend(name, values[0] if values else 0, values[-1] if values else 0, 0.0, 0.0, 0.0, n, False)
    xs = range(n)
    mx, my = (n - 1) / 2, statistics.fmean(tail)
    sxx = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, tail)) / sxx
    resid = [y - (my + slope * (x - mx)) for x, y in zip(xs, tail)]
    noise = statistics.pstdev(resid)
    growth = slope * n
    return Trend(name, values[0], values[-1], slope, growth, noise, n, growth > max(3 * noise, floor))


@dataclass
class Soak:
    lab: Lab
    session: Session
    shared_disk: Path
    ws_pages: int = WS_PAGES
    cancel_every: int = 10
    kill_every: int = 25
    rows: list[Row] = field(default_factory=list)
    keep: bool = True             # the rows kept in ``rows`` (the bench writes them out instead: kept, they grow the RSS)
    finished: asyncio.Queue[Event] = field(default_factory=asyncio.Queue)
    extra_finished: int = 0
    lingered: int = 0             # old QEMUs that had not ended 10 s after their quit, cancel or kill

    @property
    def fleet(self) -> Fleet:
        return self.session.fleet

    def on_event(self, ev: Event) -> None:
        if ev.name == FINISHED:
            self.finished.put_nowait(ev)

    async def line(self, line: str) -> str:
        [o] = await self.session.run_line(line)
        if not o.ok or o.result is None:
            raise RuntimeError(f"{line}: {o.error}")
        return o.result.text()

    async def reconnected(self, name: str, old: Monitor | None, timeout: float = 30) -> Monitor:
        """The session's monitor of ``name`` once it is a new one (not ``old``) and connected."""
        guest = self.fleet.get(name)
        async with asyncio.timeout(timeout):
            while guest.monitor is None or guest.monitor is old or not guest.monitor.connected:
                await asyncio.sleep(0.02)
        return guest.monitor

    async def fresh_incoming(self, name: str) -> LabGuest:
        """A new ``-incoming defer`` QEMU on ``name``'s socket (the old process reaped first)."""
        old = self.lab.guests.get(name)
        if old is not None:
            # quit, cancelled (a 7.2 destination exits) or killed: it ends by itself. Wait for that rather
            # than kill it: killing a process asyncio has not seen exit yet races its child watcher
            # (CPython's Popen.send_signal reaps it first; the watcher then says "Unknown child process").
            try:
                async with asyncio.timeout(10):
                    await old.proc.wait()
            except TimeoutError:
                self.lingered += 1
            await old.kill()
        old_mon = self.fleet.get(name).monitor
        guest = await self.lab.start(name, MonitorKind.QMP_UNIX, ws_pages=self.ws_pages, ram_mib=RAM_MIB,
                                     incoming=True, disk=self.shared_disk)
        mon = await self.reconnected(name, old_mon)
        await wait_until(mon, lambda st: st.state is RunState.INMIGRATE)
        return guest

    async def until_active(self, src: str) -> None:
        mon = self.fleet.monitor(src)
        async with asyncio.timeout(60):
            while (await mon.migration()).status is not MigrationStatus.ACTIVE:
                await asyncio.sleep(0.05)

    async def wait_finished(self, src: str, timeout: float = 120) -> Event:
        async with asyncio.timeout(timeout):
            while True:
                ev = await self.finished.get()
                if ev.guest == src:
                    return ev
                self.extra_finished += 1

    async def settings(self, mon: Monitor) -> tuple[dict[str, object], dict[str, bool]]:
        return dict((await mon.migrate_parameters()).values), dict((await mon.migrate_capabilities()).states)

    async def one(self, n: int, src: str, dst: str) -> tuple[Row, bool]:
        """Migration number ``n`` from ``src`` to ``dst``; the row and whether the guest moved."""
        kind = "kill" if n % self.kill_every == 0 else "cancel" if n % self.cancel_every == 0 else "migrate"
        strategy = STRATEGIES[(n - 1) % len(STRATEGIES)] if kind == "migrate" else "precopy"
        flags = "--strategy auto --allow-postcopy" if strategy == "auto+postcopy" else f"--strategy {strategy}"
        if kind != "migrate":
            flags += f" {SLOW}"
        elif strategy == "postcopy":
            flags += f" {POSTCOPY_CAP}"
        src_mon = self.fleet.monitor(src)
        before = await self.settings(src_mon)
        t0 = time.monotonic()
        await self.line(f"@{src} migrate --to {dst} {flags}")
        if kind == "cancel":
            await self.until_active(src)
            await self.line(f"@{src} migrate_cancel")
        elif kind == "kill":
            await self.until_active(src)
            os.kill(self.lab.guests[dst].pid, signal.SIGKILL)
        ev = await self.wait_finished(src)
        seconds = time.monotonic() - t0
        status = str(ev.data["status"])
        expected = {"migrate": "completed", "cancel": "cancelled", "kill": "failed"}[kind]
        moved = status == "completed"
        settings = "-"
        if moved:
            await self.lab.guests[dst].wait_heartbeats(1)
            check = await check_guest_memory(self.fleet.monitor(dst), self.ws_pages, self.lab.workdir)
        else:
            st = await src_mon.status()
            if st.state is not RunState.RUNNING:
                status += f" (source {st.state.value})"
            after = await self.settings(src_mon)
            settings = "as before" if after == before else describe_change(before, after)
            check = await check_guest_memory(src_mon, self.ws_pages, self.lab.workdir)
        mem = "ok" if check.ok else f"FAILED: {check.summary()}"
        postcopy = any(" postcopy:" in d for d in self.session.migrations[src].decisions)
        return Row(n, src, dst, kind, strategy, status, expected, round(seconds, 2), postcopy, mem, settings,
                   0, 0, 0), moved

    async def run(self, count: int, report: Callable[[Row], None] = lambda row: None) -> list[Row]:
        src, dst = "a", "b"
        for n in range(1, count + 1):
            row, moved = await self.one(n, src, dst)
            if moved:
                await self.line(f"@{src} quit")
                await self.fresh_incoming(src)        # the next destination
                src, dst = dst, src
            else:
                await self.fresh_incoming(dst)        # a cancelled or killed destination has gone
            row.rss_kib, row.fds, row.tasks = rss_kib(), open_fds(), len(asyncio.all_tasks())
            row.py_blocks = sys.getallocatedblocks()
            row.heap_used_kib, row.heap_kib = heap_kib()
            row.traced_kib = traced_kib()
            row.load1 = round(os.getloadavg()[0], 2)
            if self.keep:
                self.rows.append(row)
            report(row)
        return self.rows


async def wait_until(mon: Monitor, ok: Callable[..., bool], timeout: float = 30) -> None:
    async with asyncio.timeout(timeout):
        while not ok(await mon.status()):
            await asyncio.sleep(0.02)


def describe_change(before: tuple[dict[str, object], dict[str, bool]],
                    after: tuple[dict[str, object], dict[str, bool]]) -> str:
    diffs = []
    for b, a in zip(before, after):
        for k in sorted(set(b) | set(a)):
            if b.get(k) != a.get(k):
                diffs.append(f"{k}: {b.get(k)} -> {a.get(k)}")
    return "changed: " + ", ".join(diffs)


async def soak(count: int, *, ws_pages: int = WS_PAGES, cancel_every: int = 10, kill_every: int = 25,
               report: Callable[[Row], None] = lambda row: None, keep: bool = True) -> Soak:
    """Start the two guests, attach them in one session, run ``count`` migrations; the finished Soak."""
    async with Lab() as lab:
        first = await lab.start("a", MonitorKind.QMP_UNIX, ws_pages=ws_pages, pace=PACE, ram_mib=RAM_MIB,
                                wait_banner=False)
        await lab.start("b", MonitorKind.QMP_UNIX, ws_pages=ws_pages, ram_mib=RAM_MIB, incoming=True,
                        disk=first.disk)
        await first.wait_heartbeats(1, timeout=300)     # a loaded machine can take long to boot it
        async with Fleet() as fleet:
            fleet.add("a", first.address)
            fleet.add("b", lab.guests["b"].address)
            await fleet.start()
            session = Session(fleet, default_registry(), assume_yes=True)
            run = Soak(lab, session, first.disk, ws_pages, cancel_every, kill_every, keep=keep)
            fleet.subscribe(run.on_event)
            try:
                await run.run(count, report)
            finally:
                await session.aclose()
            return run


SERIES = ("rss_kib", "fds", "tasks", "py_blocks", "heap_used_kib", "heap_kib", "traced_kib")


class Tally:
    """What the summary needs of the rows, without keeping them: their numbers in arrays, the rest counted."""

    def __init__(self) -> None:
        self.series = {name: array("q") for name in SERIES}
        self.count = self.bad = self.memchecks_ok = self.postcopy = 0
        self.kinds: Counter[str] = Counter()
        self.strategies: Counter[str] = Counter()

    def add(self, r: Row) -> None:
        for name in SERIES:
            self.series[name].append(int(getattr(r, name)))
        self.count += 1
        self.bad += not r.ok
        self.memchecks_ok += r.memcheck == "ok"
        self.postcopy += r.postcopy
        self.kinds[r.kind] += 1
        if r.kind == "migrate":
            self.strategies[r.strategy] += 1


def judge(series: dict[str, array[int]], window: int = WINDOW) -> list[Trend]:
    return [trend("RSS (KiB)", list(series["rss_kib"]), window, floor=1024),
            trend("open fds", list(series["fds"]), window, floor=0.5),
            trend("asyncio tasks", list(series["tasks"]), window, floor=0.5)]


def explain(series: dict[str, array[int]], window: int = WINDOW) -> list[Trend]:
    """What the RSS is made of, over the same window (told, not judged: the floor is the RSS's)."""
    trends = [trend("Python blocks", list(series["py_blocks"]), window),
              trend("glibc heap in use (KiB)", list(series["heap_used_kib"]), window, floor=1024),
              trend("glibc heap held (KiB)", list(series["heap_kib"]), window, floor=1024)]
    if any(series["traced_kib"]):
        trends.append(trend("tracemalloc traced (KiB)", list(series["traced_kib"]), window, floor=1024))
    return trends


class Tracer:
    """tracemalloc over the run: a snapshot every ``every`` migrations, compared by traceback with the
    previous one and with the first; the sites that grew most printed, their full tracebacks written."""

    TOP = 15

    def __init__(self, every: int, frames: int, log: Path) -> None:
        self.every = every
        self.log = log.open("w")
        self.first: tracemalloc.Snapshot | None = None
        self.first_n = 0
        self.prev: tracemalloc.Snapshot | None = None
        self.prev_n = 0
        tracemalloc.start(frames)

    def maybe(self, n: int) -> None:
        if n % self.every:
            return
        snap = tracemalloc.take_snapshot().filter_traces([tracemalloc.Filter(False, tracemalloc.__file__)])
        if self.prev is not None and self.first is not None:
            self.compare(snap, self.prev, f"migrations {self.prev_n} -> {n}")
            if self.first is not self.prev:
                self.compare(snap, self.first, f"migrations {self.first_n} -> {n} (since the first snapshot)")
        else:
            self.first, self.first_n = snap, n
        self.prev, self.prev_n = snap, n

    def compare(self, now: tracemalloc.Snapshot, then: tracemalloc.Snapshot, title: str) -> None:
        stats = now.compare_to(then, "traceback")
        total = sum(s.size_diff for s in stats)
        grew = [s for s in stats if s.size_diff > 0][:self.TOP]
        head = f"tracemalloc, {title}: traced {total / 1024:+.1f} KiB in all; the {len(grew)} sites that grew most:"
        print(head, flush=True)
        self.log.write(head + "\n")
        for s in grew:
            where = site(s.traceback)
            line = f"  {s.size_diff / 1024:+8.1f} KiB {s.count_diff:+6d} blocks (now {s.size / 1024:.1f} KiB): {where}"
            print(line, flush=True)
            # frames by file and line only: format() would read the sources into linecache, which shows up as growth
            self.log.write(line + "\n" + "".join(f"      {short(f.filename)}:{f.lineno}\n" for f in reversed(s.traceback)))
        self.log.flush()

    def close(self) -> None:
        tracemalloc.stop()
        self.log.close()


def site(tb: tracemalloc.Traceback) -> str:
    """The allocating frame and, when that is in a library, the innermost frame of kvmshell or the bench."""
    frames = list(reversed(tb))             # most recent first
    inner = frames[0]
    text = f"{short(inner.filename)}:{inner.lineno}"
    ours = next((f for f in frames if "/kvmshell/" in f.filename or "/bench/" in f.filename), None)
    if ours is not None and ours is not inner:
        text += f" <- {short(ours.filename)}:{ours.lineno}"
    return text


def short(path: str) -> str:
    for mark in ("/site-packages/", "/lib/python3", "/kvmshell/", "/bench/"):
        if mark in path:
            return path[path.index(mark) + 1:]
    return path


HEADER = f"{'n':>4} {'from':4} {'to':4} {'kind':7} {'strategy':14} {'status':11} {'s':>6} {'pc':2} {'mem':4} " \
         f"{'settings':10} {'RSS MiB':>7} {'fds':>4} {'tasks':>5} {'blocks':>7} {'heap MiB':>8} {'traced':>6} {'load':>5}"


def row_line(r: Row) -> str:
    return (f"{r.n:>4} {r.source:4} {r.dest:4} {r.kind:7} {r.strategy:14} {r.status:11} {r.seconds:>6.2f} {'pc' if r.postcopy else '-':2} "
            f"{r.memcheck[:4]:4} {r.settings[:10]:10} {r.rss_kib / 1024:>7.1f} {r.fds:>4} {r.tasks:>5} {r.py_blocks:>7} "
            f"{r.heap_used_kib / 1024:>8.1f} {r.traced_kib / 1024:>6.1f} {r.load1:>5.1f}"
            f"{'' if r.ok else '  <-- NOT AS EXPECTED: ' + r.status + ' ' + r.memcheck + ' ' + r.settings}")


async def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--count", type=int, default=200, help="migrations (default 200)")
    ap.add_argument("--out", default="bench/results-soak.jsonl", help="JSON lines written here")
    ap.add_argument("--tracemalloc", type=int, default=0, metavar="N",
                    help="trace Python allocations; compare snapshots every N migrations (default: off)")
    ap.add_argument("--frames", type=int, default=8, help="traceback depth with --tracemalloc (default 8)")
    args = ap.parse_args()
    tracer = Tracer(args.tracemalloc, args.frames, Path(args.out).with_suffix(".tracemalloc.txt")) \
        if args.tracemalloc > 0 else None
    print(f"machine: {platform.node()} {platform.machine()}, {os.cpu_count()} cpus, load {os.getloadavg()[0]:.2f}, "
          f"Python {platform.python_version()}, accel {Lab().accel}, {time.strftime('%Y-%m-%d %H:%M %Z')}")
    print(HEADER, flush=True)
    started = time.monotonic()
    tally = Tally()
    with open(args.out, "w") as out:
        def report(row: Row) -> None:         # written out and counted; not kept (the bench's rows grew the RSS)
            print(row_line(row), flush=True)
            out.write(json.dumps(asdict(row)) + "\n")
            out.flush()
            tally.add(row)
            if tracer is not None:
                tracer.maybe(row.n)
        try:
            run = await soak(args.count, report=report, keep=False)
        finally:
            if tracer is not None:
                tracer.close()
        trends = judge(tally.series)
        summary = {"summary": True, "count": tally.count, "seconds": round(time.monotonic() - started, 1),
                   "not_as_expected": tally.bad, "memchecks_ok": tally.memchecks_ok,
                   "kinds": {k: tally.kinds[k] for k in ("migrate", "cancel", "kill")},
                   "strategies": {s: tally.strategies[s] for s in STRATEGIES},
                   "postcopy_used": tally.postcopy,
                   "unexpected_finished_events": run.extra_finished, "qemu_lingered": run.lingered,
                   "trends": [asdict(t) for t in trends], "explain": [asdict(t) for t in explain(tally.series)],
                   "tracemalloc_every": args.tracemalloc, "load_at_end": os.getloadavg()}
        out.write(json.dumps(summary) + "\n")
    print(f"\n{tally.count} migrations in {summary['seconds']} s: {summary['kinds']}; memory checks ok "
          f"{tally.memchecks_ok}/{tally.count}; postcopy used in {tally.postcopy}; not as expected: {tally.bad}; "
          f"stray finish events: {run.extra_finished}; old QEMUs that did not end by themselves: {run.lingered}")
    for t in trends + explain(tally.series):
        print(t.line())
    return 1 if tally.bad or run.lingered or any(t.grows for t in trends) else 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
