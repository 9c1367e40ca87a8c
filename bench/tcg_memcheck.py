"""Does a Linux lab guest under TCG keep its memory across a plain QEMU migration? (issue 12)

No kvmshell steering: a bare QMP client sends `migrate-incoming`/`migrate` over a unix socket with
QEMU's defaults and polls `query-migrate`; then the destination's workload checks its own pages.
Runs chain: the destination of one run is the source of the next (no boot per run); a failure
(bad pages, a kernel oops, a dead QEMU, with --compare-ram a page that differs) ends the chain and the
next run boots a fresh guest.

    .venv/bin/python bench/tcg_memcheck.py --work text --ws-mib 128 --ram 512 --runs 10 \\
        --variant default [--accel tcg,thread=single] [--qemu-arg=-smp --qemu-arg=1]

The lab pads the guest's RAM under TCG on QEMU < 9.0 (kvmshell.lab.linuxguest.TCG_RAM_PAD_KIB); to
see the bug it works around, undo that with `--qemu-arg=-m --qemu-arg=512M` (the last -m wins).

`--compare-ram` starts each destination with `-S`: once the migration has completed, the source
(stopped) and the destination (paused, not yet run) dump their whole RAM with `pmemsave` and the
dumps are compared page by page (kvmshell.lab.ramdiff) before the destination gets `cont` and checks.

One JSON line per run on stdout (and appended to --out), a summary line at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kvmshell.errors import LabError  # noqa: E402
from kvmshell.lab.launcher import Lab  # noqa: E402
from kvmshell.lab.linux import linux_parts  # noqa: E402
from kvmshell.lab.linuxguest import LinuxGuest, LinuxWork, start_linux  # noqa: E402
from kvmshell.lab.ramdiff import diff_dumps  # noqa: E402


class Qmp:
    """The smallest QMP client: one command at a time, events skipped."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, path: str) -> Qmp:
        reader, writer = await asyncio.open_unix_connection(path, limit=1 << 20)
        qmp = cls(reader, writer)
        await reader.readline()                                  # the greeting
        await qmp.run("qmp_capabilities")
        return qmp

    async def run(self, command: str, **args: object) -> object:
        self.writer.write(json.dumps({"execute": command, "arguments": args}).encode() + b"\n")
        await self.writer.drain()
        while True:
            reply = json.loads(await self.reader.readline())
            if "return" in reply:
                return reply["return"]
            if "error" in reply:
                raise LabError(f"{command}: {reply['error'].get('desc')}")

    async def close(self) -> None:
        self.writer.close()


async def migrate(lab: Lab, src: LinuxGuest, dst: LinuxGuest, cap_s: float) -> dict[str, object]:
    uri = f"unix:{lab.workdir / f'{dst.name}.mig'}"
    qs, qd = await Qmp.open(str(src.address.path)), await Qmp.open(str(dst.address.path))
    try:
        await qd.run("migrate-incoming", uri=uri)
        began = time.monotonic()
        await qs.run("migrate", uri=uri)
        while True:
            info = await qs.run("query-migrate")
            assert isinstance(info, dict)
            status = info.get("status")
            if status in ("completed", "failed", "cancelled"):
                break
            if time.monotonic() - began > cap_s:
                await qs.run("migrate_cancel")
                status = "not done in time"
                break
            await asyncio.sleep(0.2)
        ram = info.get("ram", {})
        return {"status": status, "total_s": round(time.monotonic() - began, 2),
                "downtime_ms": info.get("downtime"), "passes": ram.get("dirty-sync-count"),
                "sent_mb": round(ram.get("transferred", 0) / 1e6, 1)}
    finally:
        await qs.close()
        await qd.close()


async def generation_table(guest: LinuxGuest) -> dict[int, str]:
    """The guest-physical pages of the workload's generation table (4 bytes a page of the set), labelled."""
    npages = guest.work.ws_mib * 256
    found = {await guest.where(k, gen=True) & ~0xFFF for k in [*range(0, npages, 512), npages - 1]}
    return dict.fromkeys(found, "generation table")


async def compare_ram(lab: Lab, src: LinuxGuest, dst: LinuxGuest, labels: dict[int, str]) -> dict[str, object]:
    """Dump the stopped source's and the paused destination's RAM, compare them, then `cont` the latter."""
    qs, qd = await Qmp.open(str(src.address.path)), await Qmp.open(str(dst.address.path))
    dumps = Path("/dev/shm") if Path("/dev/shm").is_dir() else lab.workdir
    paths = [dumps / f"kvmshell-ram-{guest.name}-{guest.pid}.bin" for guest in (src, dst)]
    try:
        for _ in range(300):                                    # the destination loads its last state
            status = await qd.run("query-status")
            assert isinstance(status, dict)
            if status["status"] != "inmigrate":
                break
            await asyncio.sleep(0.1)
        summary = await qs.run("query-memory-size-summary")
        assert isinstance(summary, dict)
        size = int(summary["base-memory"])
        for qmp, path in zip((qs, qd), paths):
            await qmp.run("pmemsave", val=0, size=size, filename=str(path))
        diff = await asyncio.to_thread(diff_dumps, paths[0], paths[1], labels)
        await qd.run("cont")
        return {"dst_status": status["status"], "ram_bytes": size, "ram_differing": diff.differing,
                "ram_ws_pages": diff.ws_pages, "ram_stale": diff.stale,
                "ram_gen_table": diff.labelled["generation table"], "ram_first": diff.named[:5]}
    finally:
        for path in paths:
            path.unlink(missing_ok=True)
        await qs.close()
        await qd.close()


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", default="text")
    ap.add_argument("--ws-mib", type=int, default=128)
    ap.add_argument("--rate", type=int, default=0, help="MB/s; 0 = unbounded (paced: 20)")
    ap.add_argument("--ram", type=int, default=512)
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--cap", type=float, default=60.0)
    ap.add_argument("--variant", default="default")
    ap.add_argument("--accel", default="tcg")
    ap.add_argument("--qemu-arg", action="append", default=[])
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--compare-ram", action="store_true", help="compare the RAM of both sides at switch-over")
    a = ap.parse_args()
    work = LinuxWork(a.work, ws_mib=a.ws_mib, rate_mb_s=a.rate)
    parts = await linux_parts()
    qemu_args = tuple(a.qemu_arg)
    results: list[str] = []
    async with Lab() as lab:
        src: LinuxGuest | None = None
        hop = 0
        for run in range(1, a.runs + 1):
            if src is None or not src.alive:
                hop += 1
                src = await start_linux(lab, f"g{hop}", work, parts=parts, ram_mib=a.ram, accel=a.accel,
                                        qemu_args=qemu_args, timeout=180)
                await src.wait_passes(1, timeout=120)
            hop += 1
            dst = await start_linux(lab, f"g{hop}", work, parts=parts, ram_mib=a.ram, accel=a.accel,
                                    qemu_args=qemu_args + (("-S",) if a.compare_ram else ()), incoming=True)
            row: dict[str, object] = {"variant": a.variant, "work": a.work, "ws_mib": a.ws_mib, "rate": a.rate,
                                      "ram": a.ram, "accel": a.accel, "qemu_args": list(qemu_args), "run": run,
                                      "load1": round(os.getloadavg()[0], 2)}
            labels = await generation_table(src) if a.compare_ram and a.work != "idle" else {}
            row.update(await migrate(lab, src, dst, a.cap))
            if row["status"] != "completed":
                row["memcheck"] = "n/a"
                await dst.kill()
            else:
                if a.compare_ram:
                    row.update(await compare_ram(lab, src, dst, labels))
                await src.kill()
                try:
                    if a.work != "idle":
                        await dst.wait_passes(1, timeout=90)
                    check = await dst.check(timeout=90)
                    row["memcheck"] = "ok" if check.ok else check.line
                except LabError as e:
                    row["memcheck"] = f"crashed: {e}"
                src = dst
                if row["memcheck"] != "ok" or row.get("ram_differing"):      # the next run starts whole
                    await dst.kill()
                    src = None
            line = json.dumps(row)
            print(line, flush=True)
            if a.out:
                with a.out.open("a") as f:
                    f.write(line + "\n")
            results.append(str(row["memcheck"]))
    done = [r for r in results if r != "n/a"]
    bad = [r for r in done if r != "ok"]
    print(f"# {a.variant} {a.work} {a.ws_mib} MiB in {a.ram} MiB: {len(bad)} of {len(done)} completed "
          f"migrations failed the check ({len(results) - len(done)} did not complete)", flush=True)


if __name__ == "__main__":
    asyncio.run(main())
