"""Migration policies side by side on shaped links between two test hosts (network namespaces).

For each link (1 Gbit/s, 10 Gbit/s, unshaped) and each guest (idle; dirtying 20 MB/s; ~110 MB/s over a
100 MiB working set), a fresh 512 MiB source in one namespace and a destination in the other, and
each policy: (a) QEMU defaults through a plain `migrate`, (b) defaults + auto-converge, (c) kvmshell's
strategies. Prints one row per run (total time, downtime, bytes sent, completed within the cap,
memory check on the destination, the model's prediction at the start and after the first pass),
and writes the rows as JSON lines for bench/RESULTS.md. Needs root (network namespaces).

    .venv/bin/python bench/bench_migration.py [--links 1gbit,10gbit,none] [--loads idle,20,110]
        [--policies defaults,defaults+ac,precopy,converge,postcopy,auto,auto+postcopy] [--cap 60]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from kvmshell.core.monitor.fleet import Fleet
from kvmshell.core.migration.live.job import MigrationJob
from kvmshell.core.migration.live.request import MigrationRequest
from kvmshell.core.migration.model.predict import Prediction
from kvmshell.lab import image
from kvmshell.lab.launcher import Lab, MonitorKind
from kvmshell.lab.netns import TestNetwork, netns_available
from kvmshell.lab.verify import check_guest_memory

RAM_MIB = 512
WS_PAGES = 25600                          # 100 MiB
LOADS = {"idle": (0, 0), "20": (WS_PAGES, image.pace_for_rate(20e6)), "110": (WS_PAGES, image.pace_for_rate(110e6)),
         "150": (WS_PAGES, image.pace_for_rate(150e6))}
LINK_BYTES = {"1gbit": 125e6, "10gbit": 1.25e9, "none": None}
POLICIES = ("defaults", "defaults+ac", "precopy", "converge", "postcopy", "auto", "auto+postcopy")


@dataclass
class Row:
    link: str
    load: str
    policy: str
    completed: bool
    status: str
    total_s: float | None
    downtime_ms: int | None
    sent_mb: float | None
    memcheck: str
    predicted_start: str
    predicted_after_pass1: str
    predicted_total_s: float | None
    wnc_after_s: float | None             # when "will not converge" was first said
    decisions: list[str]


def pred_text(p: Prediction | None) -> str:
    return p.line() if p is not None else "-"


async def one_run(net: TestNetwork, link: str, load: str, policy: str, cap: float, traces: Path) -> Row:
    ws, pace = LOADS[load]
    async with Lab() as lab:
        src = await lab.start("src", MonitorKind.QMP_UNIX, ws_pages=ws, pace=pace, ram_mib=RAM_MIB,
                              prefix=tuple(net.exec_prefix(net.src)))
        dst = await lab.start("dst", MonitorKind.QMP_UNIX, ws_pages=ws, ram_mib=RAM_MIB, incoming=True,
                              disk=src.disk, prefix=tuple(net.exec_prefix(net.dst)))
        if ws:
            await src.wait_heartbeats(2, timeout=120)
        async with Fleet() as fleet:
            fleet.add("src", src.address)
            fleet.add("dst", dst.address)
            await fleet.start()
            s, d = fleet.monitor("src"), fleet.monitor("dst")
            port = 4444
            uri = f"tcp:{net.dst.ip}:{port}"
            trace = str(traces / f"{link}-{load}-{policy}.jsonl")
            if policy in ("defaults", "defaults+ac"):
                if policy == "defaults+ac":
                    for m in (s, d):
                        await m.execute("migrate-set-capabilities",
                                        {"capabilities": [{"capability": "auto-converge", "state": True}]})
                await d.execute("migrate-incoming", {"uri": f"tcp:0.0.0.0:{port}"})
                req = MigrationRequest("src", None, uri, strategy="none", trace_path=trace,
                                       link=LINK_BYTES[link], stall_timeout=cap * 2)
                job = MigrationJob.of(fleet, req)
                await job.prepare()            # NONE: only the events capability
                await job.attach_trace()
                job.sampler.start = job.clock()
                await s.execute("migrate", {"uri": uri})
            else:
                strategy = {"auto+postcopy": "auto"}.get(policy, policy)
                req = MigrationRequest("src", "dst", uri, strategy=strategy, downtime_ms=300,
                                       link=LINK_BYTES[link], allow_postcopy=policy == "auto+postcopy",
                                       trace_path=trace, stall_timeout=cap * 2)
                job = MigrationJob.of(fleet, req)
                await job.prepare()
                await job.start()
            wnc: list[float] = []

            def watch(sample: object) -> None:
                p = job.prediction
                if p is not None and not wnc and p.verdict.value == "will not converge":
                    wnc.append(job.sampler.now)
            job.sampler.on_sample(watch)
            try:
                outcome = await asyncio.wait_for(job.run(), cap)
                status = outcome.status
            except TimeoutError:
                status = "not done in time"
                await s.execute("migrate_cancel")
                outcome = None
            info = await s.migration()
            completed = status == "completed"
            mem = "n/a"
            if completed and ws:
                await dst.wait_heartbeats(1, timeout=30)
                check = await check_guest_memory(d, ws, lab.workdir)
                mem = "ok" if check.ok else f"FAILED: {check.summary()}"
            return Row(link, load, policy, completed, status,
                       (info.total_time_ms or 0) / 1000 if completed else None,
                       info.downtime_ms if completed else None,
                       round(info.ram.transferred / 1e6, 1) if completed and info.ram else None, mem,
                       pred_text(job.marks.get("start")), pred_text(job.marks.get("first pass")),
                       job.marks["first pass"].total_s if "first pass" in job.marks else None,
                       round(wnc[0], 2) if wnc else None, job.decisions)


async def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--links", default="1gbit,10gbit,none")
    ap.add_argument("--loads", default="idle,20,110,150")
    ap.add_argument("--policies", default=",".join(POLICIES))
    ap.add_argument("--cap", type=float, default=60.0)
    ap.add_argument("--out", default="bench/results-migration.jsonl")
    args = ap.parse_args()
    why = netns_available()
    if why:
        print(f"bench_migration needs network namespaces: {why}", file=sys.stderr)
        return 2
    traces = Path(args.out).with_suffix("")
    traces.mkdir(parents=True, exist_ok=True)
    print(f"machine: {platform.node()} {platform.machine()}, {os.cpu_count()} cpus, Python {platform.python_version()}, "
          f"accel {Lab().accel}, {time.strftime('%Y-%m-%d %H:%M')}")
    with open(args.out, "w") as out:
        for link in args.links.split(","):
            async with TestNetwork(None if link == "none" else link) as net:
                for load in args.loads.split(","):
                    for policy in args.policies.split(","):
                        row = await one_run(net, link, load, policy, args.cap, traces)
                        out.write(json.dumps(row.__dict__) + "\n")
                        out.flush()
                        print(f"{link:6} {load:4} {policy:13} {row.status:17} "
                              f"total={row.total_s if row.total_s is not None else '-':<7} "
                              f"downtime={row.downtime_ms if row.downtime_ms is not None else '-':<5} "
                              f"sent={row.sent_mb if row.sent_mb is not None else '-':<7}MB mem={row.memcheck:4} "
                              f"wnc@{row.wnc_after_s} pred1={row.predicted_total_s}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
