"""Benchmark of the shell (prints figures; record them in bench/RESULTS.md).

(a) completion latency: `loadvm <TAB>` on a guest holding 200 snapshots, `@<TAB>` with 100 guests
    attached; warm (data cached, what a TAB costs) and cold (the background refresh that fills it);
(b) startup to the first prompt of `kvmshell shell` with 10 guests, in a real pty.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import pty
import statistics
import sys
import time

from prompt_toolkit.completion import CompleteEvent
from prompt_toolkit.document import Document

from kvmshell.core.commands.registry import default_registry
from kvmshell.core.commands.completion import CompletionEngine
from kvmshell.core.monitor.fleet import Fleet
from kvmshell.core.monitor.guestdata import SNAPSHOTS
from kvmshell.core.commands.session import Session
from kvmshell.lab.launcher import Lab, MonitorKind
from kvmshell.shell.app import ShellCompleter


def tab_ms(completer: ShellCompleter, line: str, runs: int = 200) -> tuple[float, int]:
    times, n = [], 0
    for _ in range(runs):
        t0 = time.perf_counter()
        n = len(list(completer.get_completions(Document(line), CompleteEvent(completion_requested=True))))
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1000, n


async def completion(lab: Lab, snapshots: int, guests: int) -> None:
    vms = await asyncio.gather(*(lab.start(f"vm{i:03d}", MonitorKind.QMP_UNIX, paused=True) for i in range(guests)))
    async with Fleet() as fleet:
        for g in vms:
            fleet.add(g.name, g.address)
        t0 = time.perf_counter()
        await fleet.start()
        print(f"attach {guests} guests: {(time.perf_counter() - t0) * 1000:.0f} ms")
        session = Session(fleet, default_registry(), current="vm000")
        mon = fleet.monitor("vm000")
        for i in range(snapshots):
            await mon.hmp(f"savevm snap{i:04d}")
        completer = ShellCompleter(CompletionEngine(session))
        t0 = time.perf_counter()
        await session.data.refresh("vm000", (SNAPSHOTS,))
        cold = (time.perf_counter() - t0) * 1000
        warm, n = tab_ms(completer, "loadvm ")
        assert n == snapshots, n
        print(f"loadvm <TAB>, {snapshots} snapshots: warm {warm:.2f} ms ({n} candidates); "
              f"cold refresh of the tags {cold:.1f} ms")
        warm, n = tab_ms(completer, "@")
        assert n == guests + 1, n
        print(f"@<TAB>, {guests} guests: warm {warm:.2f} ms ({n} candidates)")
        await session.aclose()


def startup(lab_guests: list[str]) -> float:
    """Seconds from exec of `kvmshell shell` to the first prompt on its pty."""
    args = [sys.executable, "-m", "kvmshell.cli"]
    for g in lab_guests:
        args += ["--guest", g]
    args.append("shell")
    t0 = time.perf_counter()
    pid, fd = pty.fork()
    if pid == 0:
        os.execv(sys.executable, args)
    out = b""
    try:
        while b"kvmshell> " not in out:
            out += os.read(fd, 65536)
        return time.perf_counter() - t0
    finally:
        os.write(fd, b"\x04")
        os.waitpid(pid, 0)
        os.close(fd)


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--snapshots", type=int, default=200)
    ap.add_argument("--guests", type=int, default=100)
    args = ap.parse_args()
    async with Lab() as lab:
        print(f"machine: {platform.node()} {platform.machine()} {platform.python_version()}, "
              f"accel {lab.accel}, {time.strftime('%Y-%m-%d %H:%M')}")
        await completion(lab, args.snapshots, args.guests)
    async with Lab() as lab:
        ten = await asyncio.gather(*(lab.start(f"s{i}", MonitorKind.QMP_UNIX, paused=True) for i in range(10)))
        loop = asyncio.get_running_loop()
        runs = [await loop.run_in_executor(None, startup, [g.guest_option for g in ten]) for _ in range(5)]
        bare = [await loop.run_in_executor(None, startup, []) for _ in range(3)]
        print(f"startup to first prompt, 10 guests: median {statistics.median(runs) * 1000:.0f} ms "
              f"(runs {', '.join(f'{r * 1000:.0f}' for r in runs)}); with no guest: "
              f"{statistics.median(bare) * 1000:.0f} ms")


if __name__ == "__main__":
    asyncio.run(main())
