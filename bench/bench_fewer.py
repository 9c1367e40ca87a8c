"""Fewer bytes on the wire (issue 15): QEMU's own options set by hand against kvmshell's strategies.

One fresh source (in one network namespace) and destination (in the other) per run, over a shaped
veth link (bench_migration's TestNetwork). The grid: guest (lab: the boot-sector guest, under TCG:
kvm_pvm emulates its 32-bit code one instruction at a time, too slow for full-page fills; its RAM
padded as linuxguest.ram_option says; linux: the Linux lab guest, under TCG where /dev/kvm is kvm_pvm) x load (incompressible, compressible,
sparse: a few bytes of each page change per pass) x link (1gbit, 10gbit) x RAM (512m, 2g) x policy:

  defaults            plain `migrate`, QEMU's defaults (7.2: max-bandwidth 32 MiB/s, downtime 300 ms)
  defaults+ac         the same with auto-converge on both sides
  hand:multifd+zstd   plain QMP: multifd, 4 channels, zstd level 1         } hand-tuned: max-bandwidth
  hand:xbzrle         plain QMP: XBZRLE, cache = the working set (pow. 2)  } = the link, downtime 300 ms;
  hand:postcopy       plain QMP: postcopy-ram, migrate-start-postcopy at once } the best one per case is named
  hand:ac99           plain QMP: auto-converge, cpu-throttle-initial 99 (the guest at 1 % CPU from QEMU's
                      first throttle on: the fastest auto-converge QEMU has, at the guest's expense)
  auto, auto+postcopy kvmshell's auto strategy (downtime 300 ms, the link given), without/with postcopy
  auto+pf, auto+pf+postcopy   the same with --preflight: auto measures the dirty rate, the pages and
                      both hosts' CPU before the start and picks the cheapest fewer-bytes option
  ks:NAME             kvmshell's strategy NAME (e.g. ks:multifd, ks:compress, ks:xbzrle); one that
                      does not exist in this tree is skipped with a note

Per run: total time and downtime (query-migrate: from `migrate` on), the pre-start time (kvmshell's
policies: from the job's prepare to `migrate` sent: the settings and, with --preflight, its
measurements; the wall time a user waits is pre-start + total), the guest-visible blackout
(kvmshell.lab.blackout, from the guest's heartbeats), bytes on the wire (the source veth's tx_bytes
over the run: everything QEMU sent, after compression, with TCP/IP headers; QEMU's ram.transferred
and ram.multifd-bytes are kept too: in 7.2 multifd counts pages before compression), CPU seconds of
each QEMU (/proc/PID/stat utime+stime, whole life: boot included, so compare them across policies)
and of this process (kvmshell + the bench), and the memory check on the destination.
Writes JSON lines (--out) and a Markdown table (--table) with, per case, the median and spread of
N runs and the ratios to defaults+ac, to the raw floor (non-zero RAM / link rate; non-zero RAM =
QEMU's ram.total - ram.duplicate pages, the median over the case's completed runs: 7.2 finds zero
pages before multifd, so every policy counts them alike) and to the best hand-tuned policy. Needs root (namespaces).

    .venv/bin/python bench/bench_fewer.py --guests lab --loads incompressible,compressible,sparse \\
        --links 1gbit --ram 512m --policies defaults,defaults+ac,hand --runs 3
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.bench_migration import LINK_BYTES  # noqa: E402  (the links, as bench_migration shapes them)
from kvmshell.core.migration.live.job import MigrationJob  # noqa: E402
from kvmshell.core.migration.live.request import MigrationRequest  # noqa: E402
from kvmshell.core.migration.live.strategies import strategy_named  # noqa: E402
from kvmshell.core.monitor.fleet import Fleet  # noqa: E402
from kvmshell.lab import image  # noqa: E402
from kvmshell.lab.blackout import blackout  # noqa: E402
from kvmshell.lab.launcher import Lab, MonitorKind  # noqa: E402
from kvmshell.lab.linuxguest import LinuxWork, qemu_version, ram_option, start_linux  # noqa: E402
from kvmshell.lab.netns import TestNetwork, netns_available  # noqa: E402
from kvmshell.lab.verify import check_guest_memory  # noqa: E402

GUESTS = ("lab", "linux")
LOADS = ("incompressible", "compressible", "sparse")
LINKS = ("1gbit", "10gbit")
RAMS = {"512m": 512, "2g": 2048}
HAND = ("hand:multifd+zstd", "hand:xbzrle", "hand:postcopy", "hand:ac99")
POLICIES = ("defaults", "defaults+ac", *HAND, "auto", "auto+postcopy", "auto+pf", "auto+pf+postcopy")
LAB_FILL = {"incompressible": "incompressible", "compressible": "compressible", "sparse": "sparse"}
LINUX_WORK = {"incompressible": "ws", "compressible": "text", "sparse": "sparse"}
LAB_RATE = 110e6            # the boot guest's dirty rate (bytes/s): does not converge at 1 Gbit/s under defaults
LINUX_RATE_MB_S = 100
BEAT_PAGES = 64             # the boot guest's heartbeat: every 64 pages (about 2.4 ms at 110 MB/s)
DOWNTIME_MS = 300
PORT = 4444


@dataclass
class Run:
    guest: str
    load: str
    link: str
    ram: str
    policy: str
    run: int
    status: str
    note: str = ""
    total_s: float | None = None
    prestart_s: float | None = None       # kvmshell's policies: prepare + start before `migrate` (the pre-flight)
    downtime_ms: int | None = None
    blackout_ms: float | None = None
    blackout: str = ""
    wire_mb: float | None = None          # the source veth's tx bytes over the run
    ram_transferred_mb: float | None = None
    multifd_mb: float | None = None
    nonzero_mb: float | None = None       # RAM that is not zero (first pass: normal pages)
    cpu_src_s: float | None = None
    cpu_dst_s: float | None = None
    cpu_kvmshell_s: float | None = None
    memcheck: str = "n/a"
    dirty_mb_s: float | None = None       # the boot guest's dirty rate in the 2 s before the start (its beats)
    load1: float | None = None            # the host's 1-minute load average at the start (a shared machine)
    decisions: list[str] = field(default_factory=list)   # kvmshell's policies: what auto chose and why (job.decisions)


def working_set_mib(guest: str, ram_mib: int) -> int:
    return ram_mib // 5 if guest == "lab" else ram_mib // 4


def cpu_seconds(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def tx_bytes(net: TestNetwork) -> int:
    out = subprocess.run(["ip", "-n", net.src.netns, "-s", "-j", "link", "show", "dev", net.src.dev],
                         capture_output=True, text=True, check=True).stdout
    return int(json.loads(out)[0]["stats64"]["tx"]["bytes"])


def pow2_at_least(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


async def set_both(mons: tuple[Any, Any], caps: dict[str, bool], params: dict[str, Any]) -> None:
    for m in mons:
        if caps:
            await m.execute("migrate-set-capabilities",
                            {"capabilities": [{"capability": k, "state": v} for k, v in caps.items()]})
        if params:
            await m.execute("migrate-set-parameters", params)


async def plain(policy: str, s: Any, d: Any, uri: str, link: float, ws_bytes: int, cap: float) -> dict[str, Any]:
    """A policy set by hand through plain QMP; the last query-migrate."""
    caps: dict[str, bool] = {}
    params: dict[str, Any] = {}
    if policy == "defaults+ac":
        caps["auto-converge"] = True
    elif policy.startswith("hand:"):
        params = {"max-bandwidth": int(link), "downtime-limit": DOWNTIME_MS}
        if policy == "hand:multifd+zstd":
            caps["multifd"] = True
            params |= {"multifd-channels": 4, "multifd-compression": "zstd", "multifd-zstd-level": 1}
        elif policy == "hand:xbzrle":
            caps["xbzrle"] = True
            params["xbzrle-cache-size"] = pow2_at_least(ws_bytes)
        elif policy == "hand:postcopy":
            caps["postcopy-ram"] = True
        elif policy == "hand:ac99":
            caps["auto-converge"] = True
            params |= {"cpu-throttle-initial": 99, "max-cpu-throttle": 99}
    await set_both((s, d), caps, params)
    await d.execute("migrate-incoming", {"uri": f"tcp:0.0.0.0:{PORT}"})
    await s.execute("migrate", {"uri": uri})
    if policy == "hand:postcopy":
        await s.execute("migrate-start-postcopy")
    return await wait_end(s, cap)


async def wait_end(s: Any, cap: float) -> dict[str, Any]:
    deadline = time.monotonic() + cap
    while True:
        info = await s.execute("query-migrate")
        if info.get("status") in ("completed", "failed", "cancelled") or time.monotonic() > deadline:
            return dict(info)
        await asyncio.sleep(0.1)


async def kvmshell_policy(policy: str, fleet: Fleet, uri: str, link: float, cap: float,
                          trace: Path) -> tuple[dict[str, Any], float, list[str]]:
    """query-migrate at the end, the seconds before `migrate` was sent (prepare and start), and the job's
    decision lines (what auto chose and why, in numbers)."""
    strategy = "auto" if policy.startswith("auto") else policy.removeprefix("ks:")
    req = MigrationRequest("src", "dst", uri, strategy=strategy, downtime_ms=DOWNTIME_MS, link=link,
                           allow_postcopy=policy.endswith("+postcopy"), preflight="+pf" in policy,
                           trace_path=str(trace), stall_timeout=cap * 2)
    job = MigrationJob.of(fleet, req)
    t0 = time.monotonic()
    await job.prepare()
    await job.start()
    prestart = round(time.monotonic() - t0, 2)
    try:
        await asyncio.wait_for(job.run(), cap)
    except TimeoutError:
        pass
    return dict(await fleet.monitor("src").execute("query-migrate")), prestart, list(job.decisions)


def missing_strategy(policy: str) -> str | None:
    if not policy.startswith("ks:"):
        return None
    try:
        strategy_named(policy[3:])
    except ValueError:
        return f"kvmshell has no strategy {policy[3:]!r} in this tree: skipped"
    return None


async def one_run(net: TestNetwork, guest: str, load: str, link: str, ram: str, policy: str, n: int,
                  cap: float, traces: Path) -> Run:
    row = Run(guest, load, link, ram, policy, n, "skipped")
    note = missing_strategy(policy)
    if note:
        row.note = note
        return row
    ram_mib = RAMS[ram]
    ws_mib = working_set_mib(guest, ram_mib)
    link_rate = LINK_BYTES[link]
    assert link_rate is not None
    src_pre, dst_pre = tuple(net.exec_prefix(net.src)), tuple(net.exec_prefix(net.dst))
    async with Lab() as lab:
        if guest == "lab":
            ws_pages = ws_mib * 256
            pace = image.pace_for_rate(LAB_RATE)
            tcg: dict[str, Any] = dict(accel="tcg", extra_args=("-m", ram_option(ram_mib, "tcg", qemu_version())))
            src: Any = await lab.start("src", MonitorKind.QMP_UNIX, ws_pages=ws_pages, pace=pace, ram_mib=ram_mib,
                                       prefix=src_pre, fill=LAB_FILL[load], beat_pages=BEAT_PAGES, **tcg)
            dst: Any = await lab.start("dst", MonitorKind.QMP_UNIX, ws_pages=ws_pages, ram_mib=ram_mib,
                                       incoming=True, disk=src.disk, prefix=dst_pre, **tcg)
            await src.wait_heartbeats(2, timeout=300)
        else:
            work = LinuxWork(LINUX_WORK[load], ws_mib=ws_mib, rate_mb_s=LINUX_RATE_MB_S)
            src = await start_linux(lab, "src", work, ram_mib=ram_mib, prefix=src_pre, timeout=300)
            dst = await start_linux(lab, "dst", work, ram_mib=ram_mib, prefix=dst_pre, incoming=True)
            await src.wait_passes(2, timeout=300)
        async with Fleet() as fleet:
            fleet.add("src", src.address)
            fleet.add("dst", dst.address)
            await fleet.start()
            s, d = fleet.monitor("src"), fleet.monitor("dst")
            uri = f"tcp:{net.dst.ip}:{PORT}"
            tx0, cpu0 = tx_bytes(net), sum(os.times()[:2])
            row.load1 = round(os.getloadavg()[0], 1)
            if guest == "lab":
                now = time.monotonic()
                recent = sum(1 for b in src.beats if b.host_s >= now - 2)
                row.dirty_mb_s = round(recent * BEAT_PAGES * image.PAGE_SIZE / 2 / 1e6, 1)
            if policy.startswith("hand:") or policy in ("defaults", "defaults+ac"):
                info = await plain(policy, s, d, uri, link_rate, ws_mib << 20, cap)
            else:
                info, row.prestart_s, row.decisions = await kvmshell_policy(
                    policy, fleet, uri, link_rate, cap, traces / f"{guest}-{load}-{link}-{ram}-{policy}-{n}.jsonl")
            row.cpu_kvmshell_s = round(sum(os.times()[:2]) - cpu0, 2)
            row.wire_mb = round((tx_bytes(net) - tx0) / 1e6, 1)
            row.status = str(info.get("status"))
            if row.status != "completed":
                await s.execute("migrate_cancel")
                row.note = str(info.get("error-desc", "not done within the cap"))
            ram_info = info.get("ram", {})
            row.ram_transferred_mb = round(ram_info.get("transferred", 0) / 1e6, 1)
            row.multifd_mb = round(ram_info.get("multifd-bytes", 0) / 1e6, 1)
            row.nonzero_mb = round((ram_info.get("total", 0) - ram_info.get("duplicate", 0) * 4096) / 1e6, 1)
            if row.status == "completed":
                row.total_s = info.get("total-time", 0) / 1000
                row.downtime_ms = info.get("downtime")
                row.memcheck, row.blackout_ms, row.blackout = await after(guest, src, dst, d, ws_mib, lab)
            row.cpu_src_s, row.cpu_dst_s = cpu_seconds(src.pid), cpu_seconds(dst.pid)
    return row


async def after(guest: str, src: Any, dst: Any, d: Any, ws_mib: int, lab: Lab) -> tuple[str, float | None, str]:
    """Memory check on the destination and the blackout from the heartbeats."""
    try:
        if guest == "lab":
            await dst.wait_heartbeats(1, timeout=120)
            check = await check_guest_memory(d, ws_mib * 256, lab.workdir)
            mem = "ok" if check.ok else f"FAILED: {check.summary()}"
        else:
            await dst.wait_passes(1, timeout=120)
            result = await dst.check(timeout=300)
            mem = "ok" if result.ok else f"FAILED: {result.line}"
        for _ in range(100):
            if len(dst.beats) >= 20:
                break
            await asyncio.sleep(0.1)
        b = blackout(src.beats, dst.beats)
        return mem, round(b.ms, 1), b.line()
    except Exception as e:                   # a broken run is a row, not the end of the bench
        return f"FAILED: {e}", None, ""


# --------------------------------------------------------------------------- the table


def med(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


def spread(xs: list[float]) -> str:
    return f"{min(xs):.2f}-{max(xs):.2f}" if len(xs) > 1 else ""


def table(rows: list[Run]) -> str:
    cases: dict[tuple[str, str, str, str], list[Run]] = {}
    skipped: set[str] = set()
    for r in rows:
        cases.setdefault((r.guest, r.load, r.link, r.ram), []).append(r)
    out = ["| guest | load | link | RAM | policy | runs ok | total s (median, range) | pre-start s | QEMU downtime ms | "
           "guest blackout ms | wire MB | CPU s src/dst/kvmshell | memcheck | x defaults+ac | x floor | x best hand | "
           "x best hand in limit |",
           "|" + "---|" * 17]
    for (guest, load, link, ram), case in cases.items():
        by: dict[str, list[Run]] = {}
        for r in case:
            by.setdefault(r.policy, []).append(r)

        def total(policy: str) -> float | None:
            return med([r.total_s for r in by.get(policy, []) if r.total_s is not None])
        def blackout_ms(policy: str) -> float | None:
            return med([r.blackout_ms for r in by.get(policy, []) if r.blackout_ms is not None])
        hands = [(t, p) for p in HAND if (t := total(p)) is not None]
        best_t, best = min(hands) if hands else (None, "")
        # the best whose guest-visible blackout (median) kept within the downtime limit
        held = [(t, p) for t, p in hands if (b := blackout_ms(p)) is not None and b <= DOWNTIME_MS]
        held_t, held_best = min(held) if held else (None, "")
        ac = total("defaults+ac")
        nonzero = med([r.nonzero_mb for r in case if r.nonzero_mb])
        link_rate = LINK_BYTES[link] or 0
        floor = nonzero * 1e6 / link_rate if nonzero and link_rate else None
        dirty = med([r.dirty_mb_s for r in case if r.dirty_mb_s is not None])
        for policy, runs in by.items():
            ok = [r for r in runs if r.total_s is not None]
            if all(r.status == "skipped" for r in runs):
                skipped.add(runs[0].note)
                continue
            if not ok:
                note = next((r.note for r in runs if r.note), runs[0].status)
                out.append(f"| {guest} | {load} | {link} | {ram} | {policy} | 0/{len(runs)} | {note} |" + " |" * 10)
                continue
            t = med([r.total_s for r in ok if r.total_s is not None]) or 0.0

            def m(attr: str, digits: int = 0) -> str:
                v = med([getattr(r, attr) for r in ok if getattr(r, attr) is not None])
                return "-" if v is None else f"{v:.{digits}f}"

            def ratio(base: float | None) -> str:
                return f"{t / base:.2f}" if base else "-"
            name = policy + (" (best hand)" if policy == best else "") + (" (best in limit)" if policy == held_best else "")
            mem = "ok" if all(r.memcheck == "ok" for r in ok) else "; ".join(r.memcheck for r in ok if r.memcheck != "ok")
            out.append(f"| {guest} | {load} | {link} | {ram} | {name} | {len(ok)}/{len(runs)} | "
                       f"{t:.2f} ({spread([r.total_s for r in ok if r.total_s is not None])}) | {m('prestart_s', 1)} | "
                       f"{m('downtime_ms')} | "
                       f"{m('blackout_ms')} | {m('wire_mb')} | {m('cpu_src_s', 1)}/{m('cpu_dst_s', 1)}/"
                       f"{m('cpu_kvmshell_s', 1)} | {mem} | {ratio(ac)} | {ratio(floor)} | {ratio(best_t)} | {ratio(held_t)} |")
        rate = f"; the guest dirtied {dirty:.0f} MB/s before the start (median)" if dirty is not None else ""
        out.append(f"| {guest} | {load} | {link} | {ram} | *floor* | | {floor:.2f} s = {nonzero:.0f} MB non-zero / "
                   f"{link_rate / 1e6:.0f} MB/s{rate} |" + " |" * 10 if floor and nonzero else
                   f"| {guest} | {load} | {link} | {ram} | *floor* | | unknown (no completed run){rate} |" + " |" * 10)
    return "\n".join(out + [f"\n{note}" for note in sorted(skipped)] + decided(rows))


STEERING = ("wire", "preflight", "postcopy", "throttle", "release")   # the decisions that say what auto chose


def steering(decisions: list[str]) -> list[str]:
    """The decision lines that say what a kvmshell policy chose and why ("t=0.0s preflight: ...")."""
    return [d for d in decisions if d.split(" ", 2)[1].rstrip(":") in STEERING]


def decided(rows: list[Run]) -> list[str]:
    """Per kvmshell run, what it chose and why: the lines RESULTS quotes."""
    out = [f"- {r.guest} {r.load} {r.link} {r.ram} {r.policy} #{r.run}: " + "\n  ".join(steering(r.decisions))
           for r in rows if steering(r.decisions)]
    return ["", "What kvmshell's policies chose, and why (the job's decision lines):", "", *out] if out else []


def pick(text: str, allowed: tuple[str, ...] | list[str], what: str) -> list[str]:
    items = [x for x in text.split(",") if x]
    expanded: list[str] = []
    for x in items:
        if x == "hand":
            expanded += HAND
        elif x in allowed or (what == "policy" and x.startswith("ks:")):
            expanded.append(x)
        else:
            raise SystemExit(f"bench_fewer: unknown {what} {x!r}: one of {', '.join(allowed)}")
    return expanded


async def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--guests", default="lab,linux")
    ap.add_argument("--loads", default=",".join(LOADS))
    ap.add_argument("--links", default=",".join(LINKS))
    ap.add_argument("--ram", default=",".join(RAMS))
    ap.add_argument("--policies", default=",".join(POLICIES) + ",ks:multifd,ks:compress,ks:xbzrle",
                    help="names, or 'hand' for the three hand-tuned ones")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--cap", type=float, default=120.0, help="seconds a migration may take before it is cancelled")
    ap.add_argument("--out", default="bench/results-fewer.jsonl")
    ap.add_argument("--table", default="bench/results-fewer.md")
    args = ap.parse_args()
    guests, loads = pick(args.guests, GUESTS, "guest"), pick(args.loads, LOADS, "load")
    links, rams = pick(args.links, LINKS, "link"), pick(args.ram, tuple(RAMS), "RAM size")
    policies = pick(args.policies, POLICIES, "policy")
    why = netns_available()
    if why:
        print(f"bench_fewer needs network namespaces: {why}", file=sys.stderr)
        return 2
    traces = Path(args.out).with_suffix("")
    traces.mkdir(parents=True, exist_ok=True)
    print(f"machine: {platform.node()} {platform.machine()}, {os.cpu_count()} cpus, load {os.getloadavg()[0]:.1f}, "
          f"{time.strftime('%Y-%m-%d %H:%M %Z')}", flush=True)
    rows: list[Run] = []
    with open(args.out, "w") as out:
        for link in links:
            async with TestNetwork(link) as net:
                for guest in guests:
                    for ram in rams:
                        for load in loads:
                            for n in range(args.runs):          # runs interleaved: drift hits every policy
                                for policy in policies:
                                    try:
                                        row = await one_run(net, guest, load, link, ram, policy, n, args.cap,
                                                            traces)
                                    except Exception as e:     # a QEMU gone (killed, crashed): a row, go on
                                        row = Run(guest, load, link, ram, policy, n, "error",
                                                  note=f"{type(e).__name__}: {e}")
                                    rows.append(row)
                                    out.write(json.dumps(asdict(row)) + "\n")
                                    out.flush()
                                    print(f"{guest} {load:14} {link:6} {ram:4} {policy:18} #{n} {row.status:9} "
                                          f"total={row.total_s} pre={row.prestart_s} down={row.downtime_ms} blackout={row.blackout_ms} "
                                          f"wire={row.wire_mb}MB cpu={row.cpu_src_s}/{row.cpu_dst_s}/"
                                          f"{row.cpu_kvmshell_s} mem={row.memcheck} dirty={row.dirty_mb_s}MB/s "
                                          f"load={row.load1} {row.note}", flush=True)
                                    for line in steering(row.decisions):
                                        print(f"    {line}", flush=True)
    Path(args.table).write_text(table(rows) + "\n")
    print(table(rows))
    return 0


async def cancellable() -> int:
    """main(), cancelled by SIGTERM or SIGINT so that the guests and the namespaces are cleaned up."""
    task = asyncio.current_task()
    assert task is not None
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, task.cancel)
    try:
        return await main()
    except asyncio.CancelledError:
        print("bench_fewer: stopped; the rows so far are in --out", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(asyncio.run(cancellable()))
