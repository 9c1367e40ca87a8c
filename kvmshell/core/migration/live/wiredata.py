"""Before the start: what the guest's pages look like on the wire and how much CPU both hosts have to
spare (the figures of ``model/wire.py``), and the fewer-bytes settings a strategy starts with.

The pages: random guest pages read twice through the monitor (``xp``) a moment apart: how well the
non-zero ones compress (zstd and zlib at level 1, timed here for their speed), how well the ones that
changed in between compress (the pages the re-sends carry: on a Linux guest its page cache compresses,
the data it rewrites may not), how many bytes of such a page changed and what XBZRLE would send for it. The CPU: one ``cpu`` line of
/proc/stat on each host, half a second apart, in one shell command per host. Both cost about 2-3 s
before the start and dirty nothing.
"""

from __future__ import annotations

import time
import zlib
from collections.abc import Callable
from typing import TYPE_CHECKING

import zstandard

from kvmshell.core.hosts.pool import HostPool
from kvmshell.core.hosts.shell import HostShell
from kvmshell.core.migration.model.wire import (
    PLAIN, STREAM_RATE, Headroom, WireData, WireInputs, WireOption, delta_share, idle_cores, xbzrle_size,
)
from kvmshell.core.monitor.base import Monitor
from kvmshell.errors import CommandFailed, KvmError

if TYPE_CHECKING:
    from kvmshell.core.migration.live.job import MigrationJob

WIRE_PAGES = 192                 # pages read (twice): ~1 s a read through HMP `xp`
TIMED_S = 0.02                   # compress the sample repeatedly for at least this long to time it
CPU_WINDOW_S = 0.5
MIN_CHANGED = 4                  # changed pages it takes to cost the re-sends at their own compression


def _speed(compress: Callable[[bytes], bytes], pages: list[bytes]) -> tuple[float, float]:
    """(compressed / raw, raw bytes/s) of ``compress`` over ``pages``, one page at a time."""
    raw = sum(len(p) for p in pages)
    ratio = _ratio(compress, pages)
    runs, t0 = 0, time.perf_counter()
    while True:
        for p in pages:
            compress(p)
        runs += 1
        took = time.perf_counter() - t0
        if took >= TIMED_S:
            return ratio, runs * raw / took


async def wire_data(mon: Monitor, count: int = WIRE_PAGES, seed: int | None = None) -> WireData:
    """Read ``count`` random pages twice and say what they would cost on the wire."""
    addresses = await mon.page_addresses(count, seed=seed)
    t0 = time.monotonic()
    first = await mon.read_pages(addresses)
    second = await mon.read_pages(addresses)
    interval = time.monotonic() - t0
    used = [p for p in second if any(p)]
    zstd = zstandard.ZstdCompressor(level=1)
    if used:
        zstd_ratio, zstd_speed = _speed(zstd.compress, used)
        zlib_ratio, zlib_speed = _speed(lambda p: zlib.compress(p, 1), used)
    else:
        zstd_ratio = zlib_ratio = 0.0
        zstd_speed = zlib_speed = 1e9
    pairs = [(a, b) for a, b in zip(first, second) if a != b]
    deltas = [delta_share(a, b) for a, b in pairs]
    encoded = [xbzrle_size(a, b) / len(b) for a, b in pairs]
    rewritten = [b for _, b in pairs if any(b)]        # what the re-sends carry: the changed pages as they are now
    again = len(rewritten) >= MIN_CHANGED
    return WireData(len(addresses), 1 - len(used) / max(1, len(addresses)), zstd_ratio, zlib_ratio, zstd_speed,
                    zlib_speed, changed=len(deltas), delta_fraction=sum(deltas) / len(deltas) if deltas else None,
                    interval_s=interval / 2, xbzrle_share=sum(encoded) / len(encoded) if encoded else None,
                    changed_zstd_ratio=_ratio(zstd.compress, rewritten) if again else None,
                    changed_zlib_ratio=_ratio(lambda p: zlib.compress(p, 1), rewritten) if again else None)


def _ratio(compress: Callable[[bytes], bytes], pages: list[bytes]) -> float:
    """Compressed / raw size of ``pages``, one page at a time."""
    return sum(len(compress(p)) for p in pages) / sum(len(p) for p in pages)


async def idle_of(shell: HostShell) -> tuple[float, int]:
    """(idle cores, cores) of one host over CPU_WINDOW_S."""
    out = await shell.check(f"head -1 /proc/stat; sleep {CPU_WINDOW_S}; head -1 /proc/stat; nproc",
                            "reading /proc/stat", timeout=10)
    lines = out.splitlines()
    cores = int(lines[2])
    return idle_cores(lines[0], lines[1]) * cores, cores


async def headroom(hosts: HostPool | None, source: Monitor, dest: Monitor | None) -> Headroom:
    """Idle cores on the source's host and the destination's (the same host: measured once)."""
    src = HostShell(hosts, source.address.ssh)
    s = await idle_of(src)
    same = dest is None or dest.address.ssh == source.address.ssh
    d = s if same else await idle_of(HostShell(hosts, dest.address.ssh if dest is not None else None))
    return Headroom(s[0], s[1], d[0], d[1])


async def compressions(mon: Monitor) -> frozenset[str]:
    """The multifd compressions the guest's QEMU has (its schema), zstd and zlib if it cannot say."""
    found = await mon.argument_choices("migrate-set-parameters", "multifd-compression")
    return found if found is not None else frozenset({"zstd", "zlib"})


async def check_supported(job: MigrationJob, option: WireOption) -> None:
    """CommandFailed in one line if a side's QEMU lacks a capability or the compression ``option`` needs
    (from the guest: its capabilities and its schema)."""
    sides = [m for m in (job.source, job.dest) if m is not None]
    for mon in sides:
        have = await mon.migrate_capabilities()
        missing = [k for k, v in option.capabilities.items() if v and k not in have]
        if missing:
            raise CommandFailed(f"strategy {option.strategy}: this QEMU lacks the migration capability "
                                f"{', '.join(missing)}; pick another --strategy", guest=mon.name)
    method = option.parameters.get("multifd-compression")
    if method not in (None, "none") and method not in await compressions(job.source):
        raise CommandFailed(f"strategy {option.strategy}: this QEMU has no {method} multifd compression; pick "
                            f"another --strategy", guest=job.source.name)


async def measure_wire(source: Monitor, dest: Monitor | None, hosts: HostPool | None) -> WireInputs:
    """What every option is costed from: the guest's pages, both hosts' idle CPU, what its QEMU has."""
    data = await wire_data(source)
    room = await headroom(hosts, source, dest)
    have = await source.migrate_capabilities()
    return WireInputs(data, room, tuple(sorted(await compressions(source))), frozenset(have.states))


async def wire_option(job: MigrationJob, downtime_s: float) -> WireOption:
    """The fewer-bytes settings the job's strategy starts with, checked against both sides; a strategy
    that chooses (``wants_wire_data``) gets the pages and CPU measured first and, with the pre-flight,
    its choice among every option and postcopy at once, costed on the pre-flight's dirty range
    (model/choice.py); without it, every option costed on the page sample alone. The job says why."""
    strategy = job.strategy
    if not strategy.steers:
        return PLAIN
    costs, wire = None, None
    if strategy.wants_wire_data(job.req):
        try:
            wire = await measure_wire(job.source, job.dest, job.hosts)
        except KvmError as e:
            job.decide("wire-data", f"the pages or the CPU could not be measured ({e})")
        else:
            job.decide("wire-data", f"{wire.data.text()}; {wire.room.text()}")
            link = job.req.bandwidth or job.req.link      # unknown: costed as one stream's top rate
            costs = wire.costs(wire.sampled_guest(await job.source.ram_size(), link or STREAM_RATE, downtime_s))
    choice = None
    if job.preflight is not None and strategy.wants_wire_data(job.req):   # one choice: wire, postcopy or not
        choice = await job.preflight.measured(job, downtime_s, wire)
        if choice is not None:
            costs = [r.high for r in choice.options]
    option, why = strategy.wire_option(costs, downtime_s, choice)
    if why:
        job.decide("wire", why)
    await check_supported(job, option)
    return option
