"""Static migration between two test hosts: time per step, and kvmshell's copy against `scp`.

Two test hosts as in tests/test_static.py (tests/sshd.py's SshTestbed: host ``a`` and host ``b`` are
network namespaces joined by a veth pair, each with its own sshd and an uplink veth to this
machine's namespace). On ``a``: a guest with a 1 GiB qcow2 image, filled with non-zero data before
it starts (``qemu-io -c 'write -P 0xa5 ...'``), 256 MiB of RAM and a working set it keeps dirtying.
Then ``static-migrate GUEST --to b --keep-source`` through kvmshell's Session, as the test runs it,
with the steps timed: savevm, copy (of which: the transfer itself - the bytes streamed from a
pipeline on a through kvmshell to a pipeline on b, each hashing them as they go - timed by wrapping
the engine's ``_relay`` from outside; the wait for the two hashes after the last byte, ``_verify``;
the checksums before a copy), start with -loadvm.

Then the same files (the qcow2 as savevm left it, and its backing file) copied with ``scp`` on the
same test hosts:

* ``scp a->b``: scp run in ``a``'s namespace to ``b``'s sshd over the a-b veth, with the test's
  client key and a known_hosts made for it (``StrictHostKeyChecking=yes``);
* ``scp -3 via here``: scp run here, reading from ``a``'s sshd and writing to ``b``'s through this
  machine - the path kvmshell's copy takes when the source is a remote host (kvmshell connects to
  both hosts from where it runs and relays the bytes; the a-b veth carries none of them).

``--rate RATE`` shapes every link the copies can take (the a-b veth and both uplinks, both ways,
``tc tbf`` as kvmshell.lab.netns does); default unshaped. Prints a table and writes the figures
with the machine and date to bench/RESULTS-static.md. Needs root.

    .venv/bin/python bench/bench_static.py [--rate 1gbit] [--scp-runs 3] [--disk-mib 1024]
        [--ram-mib 256] [--ws-mib 100] [--dirty-mbps 20] [--out bench/RESULTS-static.md | --no-write]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))     # for tests.sshd

from kvmshell.config import parse_config  # noqa: E402
from kvmshell.core.hosts.shell import CHECKSUM, HostShell  # noqa: E402
from kvmshell.core.migration import static as engine  # noqa: E402
from kvmshell.core.migration.static_copy import FileCopy  # noqa: E402
from kvmshell.core.values.address import Address, SshTarget  # noqa: E402
from kvmshell.core.commands.registry import default_registry  # noqa: E402
from kvmshell.core.monitor.fleet import Fleet  # noqa: E402
from kvmshell.core.hosts.pool import HostPool  # noqa: E402
from kvmshell.core.commands.session import Session  # noqa: E402
from kvmshell.core.hosts.ssh.connection import PREFERRED_CIPHERS  # noqa: E402
from kvmshell.lab import image  # noqa: E402
from kvmshell.lab.launcher import Lab, MonitorKind, choose_accel  # noqa: E402
from kvmshell.lab.netns import TBF_LATENCY, leftover_namespaces, netns_available, parse_rate, tbf_burst  # noqa: E402
from tests.sshd import HAVE_SSHD, SshTestbed, processes_mentioning, run  # noqa: E402

VM = "benchst"
TAG = "bench1"
PATTERN = "0xa5"


@dataclass
class Timed:
    """What the wrappers around the engine saw."""

    relays: list[tuple[str, int, float]] = field(default_factory=list)     # file, bytes, seconds
    verifies: list[float] = field(default_factory=list)                    # seconds from the last byte to both hashes
    hashes: list[tuple[str, float, float]] = field(default_factory=list)   # host, start, end of each checksum run
    streams: list[tuple[float, float]] = field(default_factory=list)       # start, end of each relay + verify
    progress: list[tuple[float, str]] = field(default_factory=list)
    times: dict[str, float] = field(default_factory=dict)                   # StaticResult.times, unrounded


def instrument(timed: Timed) -> None:
    """Time the engine's transfer loop, the wait for the hashes after it, and the checksum runs before
    a copy (a file already there, a .part's prefix) by wrapping them (the engine is unchanged)."""
    relay, verify, sha, run_ = (FileCopy._relay, FileCopy._verify, HostShell.checksum, engine.StaticMigration.run)

    async def timed_run(self, plan):  # type: ignore[no-untyped-def]
        result = await run_(self, plan)
        timed.times.update(result.times)
        return result

    async def timed_relay(self, src, dst, f, offset):  # type: ignore[no-untyped-def]
        t = time.monotonic()
        moved = await relay(self, src, dst, f, offset)
        timed.relays.append((os.path.basename(f.dest), moved, time.monotonic() - t))
        timed.streams.append((t, time.monotonic()))
        return moved

    async def timed_verify(self, stream, f):  # type: ignore[no-untyped-def]
        t = time.monotonic()
        try:
            return await verify(self, stream, f)
        finally:
            timed.verifies.append(time.monotonic() - t)
            start, _ = timed.streams[-1]
            timed.streams[-1] = (start, time.monotonic())

    async def timed_sha(self, path, prefix=None, size=0, tool=CHECKSUM):  # type: ignore[no-untyped-def]
        t = time.monotonic()
        try:
            return await sha(self, path, prefix, size, tool)
        finally:
            timed.hashes.append((self.label, t, time.monotonic()))

    FileCopy._relay = timed_relay  # type: ignore[method-assign]
    FileCopy._verify = timed_verify  # type: ignore[method-assign]
    HostShell.checksum = timed_sha  # type: ignore[method-assign]
    engine.StaticMigration.run = timed_run  # type: ignore[method-assign]


async def shape(bed: SshTestbed, rate: str) -> list[str]:
    """tbf at ``rate`` on every device the copies can cross, both directions; what was shaped."""
    assert bed.net is not None
    await bed.net.set_rate(rate)
    bits = parse_rate(rate)
    tbf = ["tbf", "rate", f"{bits}bit", "burst", tbf_burst(bits), "latency", TBF_LATENCY]
    shaped = [f"{h.netns}:{h.dev}" for h in bed.net.hosts]
    links = {int(m.group(1)): m.group(2) for m in re.finditer(r"^(\d+): ([^:@]+)[@:]", await run("ip", "-o", "link"), re.M)}
    for host in bed.hosts.values():
        assert host.netns is not None
        line = await run("ip", "-n", host.netns, "-o", "link", "show", "uplink")
        peer = links[int(re.search(r"uplink@if(\d+):", line).group(1))]    # type: ignore[union-attr]
        await run("tc", "-n", host.netns, "qdisc", "add", "dev", "uplink", "root", *tbf)
        await run("tc", "qdisc", "add", "dev", peer, "root", *tbf)       # goes with the veth pair
        shaped += [f"{host.netns}:uplink", peer]
    return shaped


def pool_for(bed: SshTestbed) -> HostPool:
    config = parse_config(tomllib.loads(bed.config_toml()))  # type: ignore[arg-type]
    return HostPool.from_config(config, known_hosts=bed.known_hosts, ssh_config=bed.ssh_config,
                                connect_timeout=5.0, backoff=(0.05, 0.5), keepalive=None)


def ssh_opts(bed: SshTestbed, known_hosts: Path) -> list[str]:
    return ["-F", "/dev/null", "-i", str(bed.client_key), "-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes",
            "-o", f"UserKnownHostsFile={known_hosts}", "-o", "GlobalKnownHostsFile=/dev/null",
            "-o", "StrictHostKeyChecking=yes"]


async def timed_cmd(argv: list[str]) -> float:
    await asyncio.to_thread(os.sync)
    t = time.monotonic()
    proc = await asyncio.create_subprocess_exec(*argv, stdin=asyncio.subprocess.DEVNULL,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    out, _ = await proc.communicate()
    elapsed = time.monotonic() - t
    if proc.returncode:
        raise RuntimeError(f"`{' '.join(argv)}` failed ({proc.returncode}): {out.decode(errors='replace').strip()}")
    return elapsed


def mb(n: float) -> str:
    return f"{n / 1e6:.0f}"


async def kill_copies(dest_dir: Path) -> None:
    """The QEMU that static-migrate started (daemonized, in b's namespace: not our child)."""
    for pid in processes_mentioning(str(dest_dir)):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    async with asyncio.timeout(10):
        while processes_mentioning(str(dest_dir)):
            await asyncio.sleep(0.05)
    for run_dir in Path("/run/kvmshell").glob(f"{VM}.*"):
        shutil.rmtree(run_dir, ignore_errors=True)


async def bench(args: argparse.Namespace, base: Path) -> dict[str, object]:
    timed = Timed()
    instrument(timed)
    res: dict[str, object] = {}
    async with SshTestbed(base / "ssh", ("a", "b")) as bed:
        bed.trust()
        assert bed.net is not None
        res["netns_id"] = bed.net.id
        res["shaped"] = await shape(bed, args.rate) if args.rate else []
        dest = base / "dest"
        scp_dir = base / "scp"
        relay_dir = base / "scp3"
        async with Lab(base / "lab") as lab:
            try:
                ws = (args.ws_mib << 20) // image.PAGE_SIZE
                pace = image.pace_for_rate(args.dirty_mbps * 1e6) if ws else 0
                disk = await lab.make_disk(VM, ws, pace)
                # the boot code lives in the first MiB (the raw backing file): data goes after it
                await run("qemu-img", "resize", "-q", "-f", "qcow2", str(disk), f"{args.disk_mib + 1}M")
                t = time.monotonic()
                proc = await asyncio.create_subprocess_exec(
                    "qemu-io", "-f", "qcow2", "-c", f"write -P {PATTERN} 1M {args.disk_mib}M", str(disk),
                    stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
                _, err = await proc.communicate()
                if proc.returncode:
                    raise RuntimeError(f"qemu-io failed: {err.decode(errors='replace').strip()}")
                print(f"filled {disk.name} with {args.disk_mib} MiB of {PATTERN} in {time.monotonic() - t:.1f} s",
                      flush=True)
                src = await lab.start(VM, MonitorKind.QMP_UNIX, ws_pages=ws, pace=pace, ram_mib=args.ram_mib,
                                      disk=disk, prefix=bed["a"].prefix)
                if ws:
                    await src.wait_heartbeats(2, timeout=120)
                await asyncio.to_thread(os.sync)
                async with Fleet(hosts=pool_for(bed), backoff=(0.05, 0.5)) as fleet:
                    h = bed["a"]
                    a = src.address
                    fleet.add(VM, Address(a.protocol, a.kind, a.path, a.host, a.port, SshTarget(h.addr, h.user, h.port)))
                    await fleet.start()
                    t0 = time.monotonic()

                    def progress(guest: str, message: str) -> None:
                        timed.progress.append((time.monotonic() - t0, message))

                    session = Session(fleet, default_registry(), assume_yes=True, progress=progress)
                    try:
                        t = time.monotonic()
                        [o] = await session.run_line(f"static-migrate {VM} --to b --tag {TAG} --keep-source "
                                                     f"--dir {dest}")
                        res["total"] = time.monotonic() - t
                        if not o.ok:
                            raise RuntimeError(f"static-migrate failed: {o.error}")
                        report = dict(o.result.items) if o.result is not None else {}   # type: ignore[attr-defined]
                    finally:
                        await session.aclose()
                res["report"] = report
                res["times"] = dict(timed.times)
                # the files kvmshell copied, as they are on a now (the source stays paused)
                files = [lab.workdir / f"boot-{ws}-{pace}.raw", disk]
                res["files"] = [(f.name, f.stat().st_size) for f in files]
                res["bytes"] = sum(size for _, size in res["files"])      # type: ignore[misc]
                res["relays"] = timed.relays
                res["verifies"] = timed.verifies
                res["hashes"] = timed.hashes
                res["streams"] = timed.streams
                res["progress"] = timed.progress
                ok = all((dest / f.name).stat().st_size == f.stat().st_size for f in files)
                res["dest_sizes_ok"] = ok
            finally:
                await kill_copies(dest)
                await lab.aclose()

        # scp a -> b over the a-b veth, from a's namespace
        b = bed["b"]
        kh_direct = base / "known_hosts.direct"
        alg, b64 = Path(f"{b.host_key}.pub").read_text().split()[:2]
        kh_direct.write_text(f"{bed.net.dst.ip} {alg} {b64}\n")
        direct: list[float] = []
        relay: list[float] = []
        for i in range(args.scp_runs):
            for d in (scp_dir, relay_dir):
                shutil.rmtree(d, ignore_errors=True)
                d.mkdir()
            direct.append(await timed_cmd([*bed["a"].prefix, "scp", "-q", *ssh_opts(bed, kh_direct),
                                           *(str(p) for p in files), f"{b.user}@{bed.net.dst.ip}:{scp_dir}/"]))
            relay.append(await timed_cmd(["scp", "-3", "-q", *ssh_opts(bed, bed.known_hosts),
                                          *(f"{bed['a'].user}@{bed['a'].addr}:{p}" for p in files),
                                          f"{b.user}@{b.addr}:{relay_dir}/"]))
            print(f"scp run {i + 1}: a->b {direct[-1]:.2f} s, -3 via here {relay[-1]:.2f} s", flush=True)
            for d in (scp_dir, relay_dir):
                for f in files:
                    if (d / f.name).stat().st_size != f.stat().st_size:
                        raise RuntimeError(f"scp copy {d / f.name} has the wrong size")
        res["scp_direct"] = direct
        res["scp_relay"] = relay
        ssh_v = subprocess.run(["ssh", "-V"], capture_output=True, text=True).stderr.strip()
        res["ssh_version"] = ssh_v
    return res


def render(args: argparse.Namespace, res: dict[str, object], machine: str, when: str) -> tuple[str, str]:
    times: dict[str, float] = res["times"]            # type: ignore[assignment]
    relays: list[tuple[str, int, float]] = res["relays"]   # type: ignore[assignment]
    verify: float = sum(res["verifies"])              # type: ignore[arg-type]
    hashes: list[tuple[str, float, float]] = res["hashes"]   # type: ignore[assignment]
    nbytes: int = res["bytes"]                        # type: ignore[assignment]
    moved = sum(p[1] for p in relays)
    transfer = sum(p[2] for p in relays)
    # checksum runs outside the transfers (a file already there? a .part's prefix): wall-clock time they
    # cover (the two hosts hash at the same time) and no transfer does; the source's hash that runs
    # during a transfer is part of it
    streams: list[tuple[float, float]] = res["streams"]   # type: ignore[assignment]
    hash_wall, end = 0.0, float("-inf")
    for s, e in sorted((s, e) for _, s, e in hashes):
        for a, b in streams:
            if a <= s < b:
                s = min(b, e)
        if e > max(s, end):
            hash_wall += e - max(s, end)
            end = e
    direct = statistics.median(res["scp_direct"])      # type: ignore[arg-type]
    relay = statistics.median(res["scp_relay"])        # type: ignore[arg-type]
    copy = times.get("copy", 0.0)
    rows = [
        ("savevm (stop + savevm on a)", times.get("savevm"), None),
        ("copy step (kvmshell, all of it)", copy, nbytes / copy if copy else None),
        ("  of which transfer (hashed as it flows)", transfer, moved / transfer if transfer else None),
        ("  of which the hashes' end after the last byte", verify, None),
        ("  of which checksums before (already there?)", hash_wall, None),
        ("  other (sizes+df, starts, mv, rebase)", copy - transfer - verify - hash_wall, None),
        ("load/start (-loadvm on b, status)", times.get("start"), None),
        ("preflight", times.get("preflight"), None),
        ("static-migrate, whole command", res["total"], None),   # type: ignore[arg-type]
        (f"scp a->b over the a-b link (median of {len(res['scp_direct'])})", direct, nbytes / direct),  # type: ignore[arg-type]
        (f"scp -3 a->here->b (median of {len(res['scp_relay'])})", relay, nbytes / relay),  # type: ignore[arg-type]
    ]
    lines = [f"{'step':48} {'seconds':>8} {'MB/s':>7}"]
    for name, secs, rate in rows:
        lines.append(f"{name:48} {secs if secs is not None else float('nan'):8.2f} {mb(rate) if rate else '':>7}")
    r_transfer_direct = direct / transfer if transfer else float("nan")
    r_transfer_relay = relay / transfer if transfer else float("nan")
    r_copy_direct = direct / copy if copy else float("nan")
    r_copy_relay = relay / copy if copy else float("nan")
    ratios = [
        "kvmshell throughput / scp throughput (1.00 = as fast; target >= 0.90):",
        f"  transfer vs scp a->b             {r_transfer_direct:.2f}",
        f"  transfer vs scp -3 via here      {r_transfer_relay:.2f}",
        f"  whole copy step vs scp a->b      {r_copy_direct:.2f}",
        f"  whole copy step vs scp -3        {r_copy_relay:.2f}",
    ]
    last = [m for _, m in res["progress"] if m.startswith("copying ") and "(100 %" in m]  # type: ignore[attr-defined]
    runs = ("scp a->b runs: " + ", ".join(f"{t:.2f}" for t in res["scp_direct"])   # type: ignore[attr-defined]
            + " s; scp -3 runs: " + ", ".join(f"{t:.2f}" for t in res["scp_relay"]) + " s")  # type: ignore[attr-defined]
    report = res["report"]
    details = [runs, f"kvmshell's report: images {report.get('images')}; copied {report.get('copied')}",  # type: ignore[attr-defined]
               *(f"last progress: {m}" for m in last)]
    table = "\n".join(lines + [""] + ratios + [""] + details)
    files = ", ".join(f"{n} ({s / 2**20:.1f} MiB)" for n, s in res["files"])   # type: ignore[attr-defined]
    md = [
        "# Static migration benchmark (bench/bench_static.py)",
        "",
        f"Run: {when}, machine: {machine}.",
        f"Command: `.venv/bin/python bench/bench_static.py{' --rate ' + args.rate if args.rate else ''}"
        f"{' --scp-runs ' + str(args.scp_runs) if args.scp_runs != 3 else ''}`",
        "",
        f"Guest on host a: {args.disk_mib} MiB of {PATTERN} written into its qcow2 image before start, "
        f"{args.ram_mib} MiB RAM, {args.ws_mib} MiB working set dirtied at ~{args.dirty_mbps:g} MB/s. "
        f"`static-migrate {VM} --to b --keep-source` through kvmshell's Session; link: "
        f"{args.rate or 'unshaped'}{' (a-b veth and both uplinks)' if args.rate else ''}. "
        f"Files copied: {files}; {nbytes / 1e6:.0f} MB in all. Engine: streamed through kvmshell, checked by "
        f"`{CHECKSUM}` on both hosts as the bytes flow; kvmshell's ciphers: `{PREFERRED_CIPHERS}` "
        f"(scp: OpenSSH's default, chacha20-poly1305). {res['ssh_version']}. "
        f"1-minute load average before/after the run: {res['load'][0]:.2f}/{res['load'][1]:.2f}; "  # type: ignore[index]
        f"other QEMU processes on the machine before/after: {res['others'][0]}/{res['others'][1]}.",  # type: ignore[index]
        "",
        "```",
        table,
        "```",
        "",
    ]
    return table, "\n".join(md)


async def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rate", default=None, help="tc rate for every link, e.g. 1gbit (default: unshaped)")
    ap.add_argument("--scp-runs", type=int, default=3)
    ap.add_argument("--disk-mib", type=int, default=1024)
    ap.add_argument("--ram-mib", type=int, default=256)
    ap.add_argument("--ws-mib", type=int, default=100)
    ap.add_argument("--dirty-mbps", type=float, default=20.0)
    ap.add_argument("--out", default="bench/RESULTS-static.md")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    if args.rate:
        parse_rate(args.rate)
    why = netns_available() or (None if HAVE_SSHD else "OpenSSH server (sshd) not installed")
    if why:
        print(f"bench_static needs root, network namespaces and sshd: {why}", file=sys.stderr)
        return 2
    machine = (f"{platform.node()} {platform.machine()}, {os.cpu_count()} cpus, Python {platform.python_version()}, "
               f"accel {choose_accel()}")
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    print(f"machine: {machine}, {when}, link {args.rate or 'unshaped'}", flush=True)
    base = Path(tempfile.mkdtemp(prefix="kvmshell-bench-static-"))
    load_before, others_before = os.getloadavg()[0], len(processes_mentioning("qemu-system"))
    try:
        res = await bench(args, base)
        res["load"] = (load_before, os.getloadavg()[0])
        res["others"] = (others_before, len(processes_mentioning("qemu-system")))
        left = [*leftover_namespaces(str(res["netns_id"])), *map(str, processes_mentioning(str(base)))]
        if left:
            raise RuntimeError(f"left behind: {left}")
    finally:
        shutil.rmtree(base, ignore_errors=True)
    table, md = render(args, res, machine, when)
    print(table)
    if not args.no_write:
        out = Path(args.out)
        text = out.read_text() if out.exists() else ""
        out.write_text(text + ("\n" if text else "") + (md if not text else md.split("\n", 2)[2]))
        print(f"written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
