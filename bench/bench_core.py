"""Benchmark of the monitor core (prints figures; record them in bench/RESULTS.md).

(a) query-status round trip through kvmshell's QmpMonitor.status() against raw qemu.qmp on the same
    connection of the same guest, interleaved call by call so both see the same noise; median of N.
(b) time to attach 8 and 32 guests concurrently (QMP unix sockets, guests paused with -S).
"""

from __future__ import annotations

import argparse
import asyncio
import platform
import statistics
import time

from kvmshell.core.monitor.fleet import Fleet, GuestState
from kvmshell.core.monitor.base import open_monitor
from kvmshell.core.monitor.qmp import QmpMonitor
from kvmshell.lab.launcher import Lab, MonitorKind


async def round_trip(lab: Lab, calls: int) -> None:
    guest = await lab.start("rtt", MonitorKind.QMP_UNIX, paused=True)
    mon = await open_monitor("rtt", guest.address)
    assert isinstance(mon, QmpMonitor)
    raw_client = mon._client            # the same qemu.qmp connection, used directly
    assert raw_client is not None
    ours, raw = [], []
    for _ in range(50):                  # warm up both paths
        await mon.status()
        await raw_client.execute("query-status")
    for _ in range(calls):
        t0 = time.perf_counter_ns()
        await raw_client.execute("query-status")
        t1 = time.perf_counter_ns()
        await mon.status()
        t2 = time.perf_counter_ns()
        raw.append(t1 - t0)
        ours.append(t2 - t1)
    await mon.close()
    m_raw, m_ours = statistics.median(raw) / 1e6, statistics.median(ours) / 1e6
    print(f"query-status round trip, median of {calls}: raw qemu.qmp {m_raw:.3f} ms, "
          f"kvmshell {m_ours:.3f} ms, overhead {m_ours - m_raw:+.3f} ms, ratio {m_ours / m_raw:.2f}")


async def attach(lab: Lab, counts: list[int]) -> None:
    n = max(counts)
    guests = await asyncio.gather(*(lab.start(f"g{i}", MonitorKind.QMP_UNIX, paused=True) for i in range(n)))
    for count in counts:
        times = []
        for _ in range(3):
            async with Fleet() as fleet:
                for g in guests[:count]:
                    fleet.add(g.name, g.address)
                t0 = time.perf_counter()
                await fleet.start()
                times.append(time.perf_counter() - t0)
                assert all(g.state is GuestState.CONNECTED for g in fleet)
        print(f"attach {count:3d} guests concurrently: median {statistics.median(times) * 1000:.0f} ms "
              f"(runs: {', '.join(f'{t * 1000:.0f}' for t in times)} ms)")


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=1000)
    ap.add_argument("--guests", type=int, nargs="+", default=[8, 32])
    args = ap.parse_args()
    async with Lab() as lab:
        print(f"machine: {platform.node()} {platform.machine()} {platform.python_version()}, "
              f"accel {lab.accel}, {time.strftime('%Y-%m-%d %H:%M')}")
        await round_trip(lab, args.calls)
        await attach(lab, args.guests)


if __name__ == "__main__":
    asyncio.run(main())
