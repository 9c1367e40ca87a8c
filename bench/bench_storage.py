"""Migration without shared storage on this machine: `migrate --to DEST --copy-storage all` against
a migration of the same guest with shared storage, and QEMU's own block migration (`migrate -b`)
at several bandwidth caps.

Guests from kvmshell.lab: 64 MiB of RAM, a 16 MiB working set dirtied at ~33 MB/s, and a qcow2 data
disk of ``--disk-mib`` filled with non-zero data before the start. The destination has an empty
image of the same size. After each run both QEMUs quit and `qemu-img compare` checks the copy.

* copy-storage: time to get every mirror in sync (the stage's ``before_start``), the stage's work
  while the source is stopped (``at_switchover``: completing the mirrors), and QEMU's downtime,
  against the same guest migrated without storage (the destination opens the same image);
* `migrate -b`: sent through QMP directly (kvmshell refuses the unsafe caps, which is the point),
  with max-bandwidth at each ``--block-caps`` value and downtime-limit 300 ms: whether the copy is
  complete.

Prints a table; writes it with the machine and date to bench/RESULTS-storage.md.

    .venv/bin/python bench/bench_storage.py [--disk-mib 1024] [--runs 2] [--block-caps 100,200,400,1024]
        [--out bench/RESULTS-storage.md | --no-write]
"""

from __future__ import annotations

import argparse
import asyncio
import platform
import time
from datetime import datetime, timezone
from pathlib import Path

from kvmshell.core.commands.registry import default_registry
from kvmshell.core.monitor.fleet import Fleet
from kvmshell.core.hosts.processes import free_port
from kvmshell.core.migration.live import storage
from kvmshell.core.migration.live.job import FINISHED
from kvmshell.core.values.models import Event, RunState
from kvmshell.core.commands.session import Session
from kvmshell.lab.launcher import Lab, MonitorKind

WS, PACE, RAM = 4096, 8, 64
timing: dict[str, float] = {}


def _timed(name: str, hook):  # type: ignore[no-untyped-def]
    async def wrapper(self, job):  # type: ignore[no-untyped-def]
        t = time.monotonic()
        await hook(self, job)
        timing[name] = time.monotonic() - t
    return wrapper


storage.StorageStage.before_start = _timed("mirror_s", storage.StorageStage.before_start)  # type: ignore[method-assign]
storage.StorageStage.at_switchover = _timed("switchover_s", storage.StorageStage.at_switchover)  # type: ignore[method-assign]


async def sh(*argv: str) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(*argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    out, _ = await proc.communicate()
    return proc.returncode or 0, out.decode().strip()


async def pair(lab: Lab, fleet: Fleet, disk_mib: int, shared: bool) -> tuple[Path, Path]:
    w = lab.workdir
    src, dst = w / "src-data.qcow2", w / "dst-data.qcow2"
    for p in (src, dst):
        p.unlink(missing_ok=True)
        await sh("qemu-img", "create", "-q", "-f", "qcow2", str(p), f"{disk_mib}M")
    await sh("qemu-io", "-f", "qcow2", "-c", f"write -P 0x5a 0 {disk_mib}M", str(src))
    drive = ("-drive", f"file={src},format=qcow2,if=virtio,id=data0")
    a = await lab.start("src", MonitorKind.QMP_UNIX, ws_pages=WS, pace=PACE, ram_mib=RAM, extra_args=drive)
    b = await lab.start("dst", MonitorKind.QMP_UNIX, ws_pages=WS, pace=PACE, ram_mib=RAM, incoming=True,
                        disk=a.disk if shared else None,
                        extra_args=drive if shared else ("-drive", f"file={dst},format=qcow2,if=virtio,id=data0"))
    fleet.add("src", a.address)
    fleet.add("dst", b.address)
    await fleet.start()
    return src, dst


async def quit_both(lab: Lab, fleet: Fleet) -> None:
    async with asyncio.timeout(60):
        while (await fleet.monitor("dst").status()).state is not RunState.RUNNING:
            await asyncio.sleep(0.05)
    for name in ("src", "dst"):
        try:
            await fleet.monitor(name).execute("quit")
        except Exception:
            pass
        await lab.guests[name].proc.wait()


async def steered(disk_mib: int, copy: bool) -> dict[str, object]:
    async with Lab() as lab, Fleet() as fleet:
        src, dst = await pair(lab, fleet, disk_mib, shared=not copy)
        events: asyncio.Queue[Event] = asyncio.Queue()
        fleet.subscribe(events.put_nowait)
        session = Session(fleet, default_registry(), assume_yes=True)
        timing.clear()
        t0 = time.monotonic()
        [o] = await session.run_line("@src migrate --to dst --strategy precopy" + (" --copy-storage all" if copy else ""))
        assert o.ok, o.error
        while (ev := await events.get()).name != FINISHED:
            pass
        total = time.monotonic() - t0
        outcome = session.migrations["src"].outcome
        await session.aclose()
        await quit_both(lab, fleet)
        same = (await sh("qemu-img", "compare", str(src), str(dst)))[0] == 0 if copy else None
        return {"status": ev.data["status"], "total_s": total, "downtime_ms": outcome.downtime_ms if outcome else None,
                "ram_s": outcome.total_s if outcome else None, "identical": same, **timing}


async def block(disk_mib: int, cap_mib: int) -> dict[str, object]:
    async with Lab() as lab, Fleet() as fleet:
        src, dst = await pair(lab, fleet, disk_mib, shared=False)
        s, d = fleet.monitor("src"), fleet.monitor("dst")
        port = await free_port(None, None)
        await d.execute("migrate-incoming", {"uri": f"tcp:127.0.0.1:{port}"})
        await s.execute("migrate-set-parameters", {"max-bandwidth": cap_mib << 20, "downtime-limit": 300})
        t0 = time.monotonic()
        await s.execute("migrate", {"uri": f"tcp:127.0.0.1:{port}", "blk": True})
        left = 0
        while True:
            info = await s.migration()
            if info.disk is not None:
                left = info.disk.remaining
            if info.status.is_finished:
                break
            await asyncio.sleep(0.01)
        total = time.monotonic() - t0
        await quit_both(lab, fleet)
        rc, text = await sh("qemu-img", "compare", str(src), str(dst))
        return {"status": info.status.value, "total_s": total, "disk_left_last_seen": left, "identical": rc == 0,
                "compare": text}


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--disk-mib", type=int, default=1024)
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--block-caps", default="100,200,400,1024", help="MiB/s caps for migrate -b")
    ap.add_argument("--block-disk-mib", type=int, default=256)
    ap.add_argument("--out", default=str(Path(__file__).with_name("RESULTS-storage.md")))
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    rows = ["| run | status | total | mirrors in sync | completing them (vCPUs stopped) | QEMU downtime | copy identical |",
            "|---|---|---|---|---|---|---|"]
    for i in range(args.runs):
        for copy in (False, True):
            r = await steered(args.disk_mib, copy)
            name = f"{'--copy-storage all' if copy else 'shared storage'} #{i + 1}"
            mirror = f"{r['mirror_s']:.2f} s ({args.disk_mib / r['mirror_s']:.0f} MiB/s)" if "mirror_s" in r else "-"
            switch = f"{r['switchover_s'] * 1000:.0f} ms" if "switchover_s" in r else "-"
            same = "-" if r["identical"] is None else "yes" if r["identical"] else "NO"
            rows.append(f"| {name} | {r['status']} | {r['total_s']:.2f} s | {mirror} | {switch} | "
                        f"{r['downtime_ms']} ms | {same} |")
            print(rows[-1], flush=True)
    rows += ["", "| `migrate -b`, max-bandwidth | status | time | disk left at the last sample | copy identical |",
             "|---|---|---|---|---|"]
    for cap in (int(c) for c in args.block_caps.split(",")):
        r = await block(args.block_disk_mib, cap)
        rows.append(f"| {cap} MiB/s | {r['status']} | {r['total_s']:.2f} s | {int(r['disk_left_last_seen']) >> 20} MiB | "
                    f"{'yes' if r['identical'] else 'NO: ' + str(r['compare'])} |")
        print(rows[-1], flush=True)
    if args.no_write:
        return
    head = [f"# Migration without shared storage ({datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC)", "",
            f"`bench/bench_storage.py`: {platform.node()}, {platform.machine()}, "
            f"{(await sh('qemu-system-x86_64', '--version'))[1].splitlines()[0]}; guests with {RAM} MiB of RAM "
            f"dirtying a 16 MiB working set; a {args.disk_mib} MiB qcow2 data disk full of data for `--copy-storage`, "
            f"{args.block_disk_mib} MiB for `migrate -b`; both QEMUs on this machine (NBD over a unix socket).", ""]
    Path(args.out).write_text("\n".join(head + rows) + "\n")
    print(f"written to {args.out}")


if __name__ == "__main__":
    asyncio.run(main())
