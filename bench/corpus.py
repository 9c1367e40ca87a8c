"""Record a corpus of migration traces over a grid, for a held-out score of the model (bench/score_corpus.py).

Grid: guest (linux: the Debian lab guest under TCG; lab: the boot-sector guest, KVM where /dev/kvm opens)
x workload (idle, ws: a working set rewritten as fast as the vCPU goes, paced: 20 MB/s, text: a compressible
set, hotcold: 10 % of a large set hot; the boot-sector guest has idle, ws and paced only) x RAM (512, 2048 MiB)
x link (1gbit, 10gbit, none: unshaped veth) x policy (defaults: a plain `migrate` with QEMU's own limits;
precopy: kvmshell's precopy, uncapped; auto: kvmshell's auto) x run number.

Each run: a fresh network (two namespaces, tc-shaped), fresh guests, the workload warmed up, a pre-flight
(calc-dirty-rate over 1 s and 3 s, RAM, link, parameters, the `sample_pages` result where the Monitor has
it, and what `migrate --estimate` would say), the migration with a cap, the guest's own memory check on
the destination, then the trace gzip-compressed as bench/corpus/RUN_ID.jsonl.gz with the pre-flight and
the run's outcome in its header line (extra keys: load_trace ignores them), and one line in
bench/corpus/INDEX.jsonl. Runs already in the index are skipped (resumable). Needs root (namespaces).

    .venv/bin/python bench/corpus.py [--only guest=linux,ram=512,link=1gbit|none,policy=defaults|auto]
        [--runs 3] [--cap 40] [--list] [--dir DIR] [--same-as INDEX] [--held-out-first]

``--dir`` records into another directory (its own INDEX.jsonl): a re-check that leaves the corpus alone.
``--same-as`` records only the run ids of another index (a re-recording keeps its ids, so its split);
``--held-out-first`` records the held-out runs first, then the fit runs cell by cell (all runs of a cell
together). Every index line has the 1-, 5- and 15-minute load averages at the start and end of its run.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gzip
import hashlib
import itertools
import json
import os
import platform
import signal
import stat
import sys
import time
import traceback
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from kvmshell.core.migration.live.job import MigrationJob
from kvmshell.core.migration.live.request import MigrationRequest
from kvmshell.core.migration.model.estimate import estimate
from kvmshell.core.migration.model.predict import estimate_working_set
from kvmshell.core.monitor.fleet import Fleet
from kvmshell.errors import KvmError, LabError
from kvmshell.lab import image, linuxguest
from kvmshell.lab.launcher import Lab, MonitorKind, choose_accel
from kvmshell.lab.linuxguest import GuestCheck, LinuxWork, linux_accel, start_linux
from kvmshell.lab.netns import TestNetwork, netns_available
from kvmshell.lab.verify import check_guest_memory

CORPUS = Path(__file__).with_name("corpus")
INDEX = CORPUS / "INDEX.jsonl"
HELD_OUT_BELOW = 77          # sha256(run id) first byte below this: held out (~30 %)
PORT = 4444
PAGES_SAMPLED = 200          # guest pages sample_pages reads before the start
DIRTY_SAMPLE_PAGES = 512     # calc-dirty-rate's default sample-pages per GiB (QEMU 7.2)

GUESTS = ("linux", "lab")
WORKS = ("idle", "ws", "paced", "text", "hotcold")
RAMS = (512, 2048)
LINKS = ("1gbit", "none", "10gbit")
POLICIES = ("defaults", "auto", "precopy")
LINK_BYTES = {"1gbit": 125e6, "10gbit": 1.25e9, "none": None}

# The Linux guest's workloads (kernel command line); the set fits the 512 MiB guest with its headroom.
LINUX_WORK = {"idle": LinuxWork("idle", ws_mib=64), "ws": LinuxWork("ws", ws_mib=128),
              "paced": LinuxWork("ws", ws_mib=64, rate_mb_s=20), "text": LinuxWork("text", ws_mib=128),
              "hotcold": LinuxWork("hotcold", ws_mib=256, hot_pct=10)}
# The boot-sector guest: (working-set pages, pace) as in bench_migration.py (100 MiB set).
LAB_WS_PAGES = 25600
LAB_WORK = {"idle": (0, 0), "ws": (LAB_WS_PAGES, 0), "paced": (LAB_WS_PAGES, image.pace_for_rate(20e6))}


@dataclass(frozen=True)
class Cell:
    guest: str
    work: str
    ram: int
    link: str
    policy: str

    @property
    def name(self) -> str:
        return f"{self.guest}-{self.work}-{self.ram}m-{self.link}-{self.policy}"

    def run_id(self, n: int) -> str:
        return f"{self.name}-r{n}"

    def matches(self, only: dict[str, set[str]]) -> bool:
        return all(str(getattr(self, k)) in v for k, v in only.items())


def held_out(run_id: str) -> bool:
    """The fixed split: a hash of the run id, never the outcome."""
    return hashlib.sha256(run_id.encode()).digest()[0] < HELD_OUT_BELOW


def grid() -> Iterator[Cell]:
    """Every cell, the ones that matter most first: Linux 512 MiB, then the lab guest, 2 GiB, 10 Gbit."""
    for ram, link, guest in itertools.product(RAMS, LINKS, GUESTS):
        for work, policy in itertools.product(WORKS, POLICIES):
            if guest == "lab" and work not in LAB_WORK:
                continue
            yield Cell(guest, work, ram, link, policy)


def order_key(cell: Cell) -> tuple[int, ...]:
    return (cell.link == "10gbit", cell.ram != 512, cell.guest != "linux", cell.policy == "precopy",
            LINKS.index(cell.link), WORKS.index(cell.work))


def recorded() -> dict[str, dict[str, Any]]:
    """The index: run id -> its latest line."""
    out: dict[str, dict[str, Any]] = {}
    if INDEX.exists():
        for line in INDEX.read_text().splitlines():
            if line.strip():
                d = json.loads(line)
                out[d["run_id"]] = d
    return out


@contextlib.contextmanager
def qemu_in(lab: Lab, netns: str) -> Iterator[None]:
    """Start the Linux guest's QEMU inside a namespace: start_linux has no argv prefix (Lab.start has),
    so its QEMU is, for the duration, a two-line script that enters the namespace and execs QEMU. The
    script stays in the Lab's directory: an incoming guest's shell may open it after start_linux returned."""
    path = lab.workdir / f"qemu-in-{netns}.sh"
    path.write_text(f'#!/bin/sh\nexec ip netns exec {netns} {linuxguest.QEMU} "$@"\n')
    path.chmod(stat.S_IRWXU)
    saved = linuxguest.QEMU
    linuxguest.QEMU = str(path)
    try:
        yield
    finally:
        linuxguest.QEMU = saved


@dataclass
class Guests:
    """The two guests of a run and how to check the destination's memory."""
    src: Any
    dst: Any
    lab: Lab
    cell: Cell

    async def check_destination(self, dst_monitor: Any) -> str:
        """The memory check on the destination: "ok", "BAD ...", "crashed: ..." or "n/a"."""
        if self.cell.guest == "linux":
            try:
                if self.cell.work != "idle":
                    await self.dst.wait_passes(1, timeout=60)
                check = await guest_check(self.dst)
            except LabError as e:
                return f"crashed: {str(e)[:300]}"
            return "ok" if check.ok else f"BAD: {check.line}"
        ws = LAB_WORK[self.cell.work][0]
        if not ws:
            return "n/a"
        check = await check_guest_memory(dst_monitor, ws, self.lab.workdir)
        return "ok" if check.ok else f"BAD: {check.summary()}"


async def guest_check(guest: Any, tries: int = 3) -> GuestCheck:
    """The guest's own memory check. Right after a migration under TCG the first character typed on
    the destination's console can be lost (the workload answers "kvmshell-what heck"): ask again."""
    for _ in range(tries):
        mark = await guest.send("check")
        m = await guest.wait_line(r"kvmshell-check .*|kvmshell-what.*", start=mark, timeout=120)
        if m.group(0).startswith("kvmshell-check"):
            return GuestCheck.parse(m.group(0))
    raise LabError(f"{guest.name}: the console did not take `check` in {tries} tries (last: {m.group(0)!r})")


async def start_guests(lab: Lab, net: TestNetwork, cell: Cell) -> Guests:
    if cell.guest == "linux":
        work = LINUX_WORK[cell.work]
        with qemu_in(lab, net.src.netns):
            src = await start_linux(lab, "src", work, ram_mib=cell.ram, timeout=180)
        with qemu_in(lab, net.dst.netns):
            dst = await start_linux(lab, "dst", work, ram_mib=cell.ram, monitor=MonitorKind.QMP_UNIX,
                                    incoming=True)
        if cell.work != "idle":
            await src.wait_passes(2 if cell.work != "paced" else 1, timeout=120)
        return Guests(src, dst, lab, cell)
    ws, pace = LAB_WORK[cell.work]
    src = await lab.start("src", MonitorKind.QMP_UNIX, ws_pages=ws, pace=pace, ram_mib=cell.ram,
                          prefix=tuple(net.exec_prefix(net.src)))
    dst = await lab.start("dst", MonitorKind.QMP_UNIX, ws_pages=ws, ram_mib=cell.ram, incoming=True,
                          disk=src.disk, prefix=tuple(net.exec_prefix(net.dst)))
    if ws:
        await src.wait_heartbeats(3, timeout=120)
    return Guests(src, dst, lab, cell)


async def preflight(mon: Any, cell: Cell) -> dict[str, Any]:
    """What is known before the start: RAM, link, parameters, dirty rate over 1 s and 3 s, and the
    estimate kvmshell would print (recorded as said then; the scorer recomputes it with the current model)."""
    params = await mon.migrate_parameters()
    ram = await mon.ram_size()
    t0 = time.monotonic()
    windows = [(1, (await mon.measure_dirty_rate(1)).bytes_per_s), (3, (await mon.measure_dirty_rate(3)).bytes_per_s)]
    out: dict[str, Any] = {"ram": ram, "link": cell.link, "link_bytes_per_s": LINK_BYTES[cell.link],
                           "params": dict(params.values), "dirty_windows": windows,
                           "measure_s": round(time.monotonic() - t0, 2)}
    out["dirty_sample_pages_per_gib"] = DIRTY_SAMPLE_PAGES
    if hasattr(mon, "sample_pages"):          # the measure branch: random guest pages, zero or not
        t0 = time.monotonic()
        try:
            sp = await mon.sample_pages(PAGES_SAMPLED, seed=int(time.time()))
            out["sample_pages"] = {**asdict(sp), "zero_fraction": sp.zero_fraction,
                                   "seconds": round(time.monotonic() - t0, 2)}
        except KvmError as e:
            out["sample_pages"] = {"error": str(e)}
    D, W = estimate_working_set(windows)
    cap = float(params.max_bandwidth or 0) or None
    L = (params.downtime_limit_ms or 300) / 1000
    link = LINK_BYTES[cell.link] or cap or 0.0
    est = estimate(ram=ram, dirty_rate=D, working_set=W, link=link, cap=cap, downtime_limit_s=L, allow_postcopy=False)
    out["estimate"] = {"dirty_rate": D, "working_set": W, "auto": est.auto,
                       "options": {o.name: {"verdict": o.prediction.verdict.value, "total_s": o.prediction.total_s,
                                            "downtime_ms": o.prediction.downtime_ms} for o in est.options}}
    return out


async def migrate(fleet: Fleet, net: TestNetwork, cell: Cell, trace: Path, cap: float) -> tuple[str, Any]:
    """Run the migration under ``cell.policy`` for at most ``cap`` seconds: (status, the job)."""
    s, d = fleet.monitor("src"), fleet.monitor("dst")
    uri = f"tcp:{net.dst.ip}:{PORT}"
    link = LINK_BYTES[cell.link]
    if cell.policy == "defaults":              # strategy "none" sets nothing but the events capability
        await d.execute("migrate-incoming", {"uri": f"tcp:0.0.0.0:{PORT}"})
        req = MigrationRequest("src", None, uri, strategy="none", trace_path=str(trace), link=link,
                               stall_timeout=cap * 2)
    else:
        req = MigrationRequest("src", "dst", uri, strategy=cell.policy, link=link, trace_path=str(trace),
                               stall_timeout=cap * 2)
    job = MigrationJob.of(fleet, req)
    await job.prepare()
    await job.start()
    try:
        outcome = await asyncio.wait_for(job.run(), cap)
        status = outcome.status
    except TimeoutError:
        status = "not done in time"
        with contextlib.suppress(KvmError):
            await s.execute("migrate_cancel")
    return status, job


def store(trace: Path, run_id: str, header_extra: dict[str, Any]) -> Path:
    """The trace, its header line extended, gzip-compressed into the corpus."""
    lines = trace.read_text().splitlines()
    header = json.loads(lines[0])
    header.update(header_extra)
    lines[0] = json.dumps(header, sort_keys=True)
    out = CORPUS / f"{run_id}.jsonl.gz"
    with gzip.open(out, "wt", compresslevel=9) as f:
        f.write("\n".join(lines) + "\n")
    return out


async def one_run(cell: Cell, n: int, cap: float) -> dict[str, Any]:
    run_id = cell.run_id(n)
    began = time.monotonic()
    row: dict[str, Any] = {"run_id": run_id, "cell": cell.name, **asdict(cell), "run": n,
                           "held_out": held_out(run_id), "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                           "load_start": os.getloadavg()}
    async with TestNetwork(None if cell.link == "none" else cell.link) as net, Lab() as lab:
        try:
            return await recorded_run(lab, net, cell, run_id, cap, row, began)
        except (KvmError, OSError, TimeoutError) as e:
            tails = [f"{p.name}: {' | '.join(p.read_text(errors='replace').splitlines()[-3:])}"
                     for p in sorted(lab.workdir.glob("*.log")) + sorted(lab.workdir.glob("*.console"))
                     if p.stat().st_size]
            raise LabError(f"{e}; " + "; ".join(tails)) from e


async def recorded_run(lab: Lab, net: TestNetwork, cell: Cell, run_id: str, cap: float, row: dict[str, Any],
                       began: float) -> dict[str, Any]:
    guests = await start_guests(lab, net, cell)
    row["accel"] = guests.src.accel
    async with Fleet() as fleet:
        fleet.add("src", guests.src.address)
        fleet.add("dst", guests.dst.address)
        await fleet.start()
        pre = await preflight(fleet.monitor("src"), cell)
        trace = lab.workdir / "trace.jsonl"
        status, job = await migrate(fleet, net, cell, trace, cap)
        info = await fleet.monitor("src").migration()
        completed = status == "completed"
        mem = await guests.check_destination(fleet.monitor("dst")) if completed else "n/a"
    row.update(outcome=status, completed=completed, memcheck=mem, cap_s=cap,
               total_s=(info.total_time_ms or 0) / 1000 if completed else None,
               downtime_ms=info.downtime_ms if completed else None,
               sent_mb=round(info.ram.transferred / 1e6, 1) if info.ram else
               round(job.sampler.ring.last.transferred / 1e6, 1) if job.sampler.ring.last else None,
               decisions=job.decisions)
    if trace.exists() and trace.stat().st_size:
        store(trace, run_id, {"preflight": pre, "corpus": {k: v for k, v in row.items() if k != "decisions"}})
        row["trace"] = f"{run_id}.jsonl.gz"
    row["wall_s"] = round(time.monotonic() - began, 1)
    row["load_end"] = os.getloadavg()
    return row


def parse_only(text: str) -> dict[str, set[str]]:
    only: dict[str, set[str]] = {}
    for part in filter(None, text.split(",")):
        key, _, values = part.partition("=")
        if key not in Cell.__dataclass_fields__ or not values:
            raise SystemExit(f"--only {part!r}: KEY=V1|V2 with KEY one of {', '.join(Cell.__dataclass_fields__)}")
        only[key] = set(values.split("|"))
    return only


async def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default="", help="filters, e.g. guest=linux,ram=512,link=1gbit|none")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--cap", type=float, default=40.0, help="seconds a migration may take before it is cancelled")
    ap.add_argument("--retry-errors", action="store_true", help="run again the runs that ended in an error")
    ap.add_argument("--list", action="store_true", help="print the runs still to record and stop")
    ap.add_argument("--dir", type=Path, default=None, help="record there instead of bench/corpus")
    ap.add_argument("--same-as", type=Path, default=None, help="record only the run ids of this index")
    ap.add_argument("--held-out-first", action="store_true",
                    help="the held-out runs first, then the fit runs cell by cell")
    args = ap.parse_args()
    if args.dir is not None:
        global CORPUS, INDEX
        CORPUS, INDEX = args.dir, args.dir / "INDEX.jsonl"
    only = parse_only(args.only)
    cells = sorted((c for c in grid() if c.matches(only)), key=order_key)
    done = recorded()
    todo = [(c, n) for n in range(1, args.runs + 1) for c in cells
            if c.run_id(n) not in done or (args.retry_errors and done[c.run_id(n)]["outcome"] == "error")]
    if args.same_as is not None:
        if not args.same_as.is_file():
            print(f"--same-as {args.same_as}: no such index", file=sys.stderr)
            return 2
        ids = {json.loads(line)["run_id"] for line in args.same_as.read_text().splitlines() if line.strip()}
        todo = [(c, n) for c, n in todo if c.run_id(n) in ids]
    if args.held_out_first:
        todo.sort(key=lambda cn: (not held_out(cn[0].run_id(cn[1])), order_key(cn[0]), cn[1]))
    else:
        todo.sort(key=lambda cn: (order_key(cn[0])[:3], cn[1], order_key(cn[0])[3:]))
    if args.list:
        for c, n in todo:
            print(c.run_id(n))
        return 0
    why = netns_available()
    if why:
        print(f"corpus.py needs network namespaces: {why}", file=sys.stderr)
        return 2
    CORPUS.mkdir(parents=True, exist_ok=True)
    print(f"machine: {platform.node()} {platform.machine()}, {os.cpu_count()} cpus, Python {platform.python_version()}, "
          f"lab accel {choose_accel()}, linux accel {linux_accel()}, {time.strftime('%Y-%m-%d %H:%M')} UTC; "
          f"{len(todo)} runs to record", flush=True)
    for c, n in todo:
        try:
            row = await one_run(c, n, args.cap)
        except (KvmError, OSError, TimeoutError) as e:
            row = {"run_id": c.run_id(n), "cell": c.name, **asdict(c), "run": n, "held_out": held_out(c.run_id(n)),
                   "outcome": "error", "error": f"{type(e).__name__}: {e}"[:500],
                   "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "load_end": os.getloadavg()}
            traceback.print_exc()
        with open(INDEX, "a") as f:
            f.write(json.dumps(row, sort_keys=True) + "\n")
        print(f"{row['run_id']:40} {row['outcome']:17} total={row.get('total_s')} down={row.get('downtime_ms')} "
              f"sent={row.get('sent_mb')}MB mem={row.get('memcheck', '-')} wall={row.get('wall_s')}s", flush=True)
    return 0


async def main_until_term() -> int:
    """main(), cancelled on SIGTERM so that guests, namespaces and work directories are cleaned up."""
    task = asyncio.ensure_future(main())
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    try:
        return await task
    except asyncio.CancelledError:
        print("corpus.py: stopped (SIGTERM); the runs recorded so far are in the index", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(asyncio.run(main_until_term()))
