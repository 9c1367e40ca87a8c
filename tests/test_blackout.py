"""The blackout a migrated guest sees (kvmshell.lab.blackout), the boot guest's fills and page
heartbeat, and the Linux guest's sparse workload: timed on synthetic beats, then for real with a
migration between two QEMUs over loopback, where the guest's blackout must cover QEMU's downtime."""

from __future__ import annotations

import asyncio
import math
import struct

import pytest

from kvmshell.core.monitor.fleet import Fleet
from kvmshell.errors import LabError
from kvmshell.lab import image
from kvmshell.lab.blackout import Beat, blackout, blackout_ms
from kvmshell.lab.launcher import Lab, MonitorKind
from kvmshell.lab.linux import PartsMissing, linux_parts
from kvmshell.lab.linuxguest import LinuxWork, qemu_version, ram_option, start_linux
from kvmshell.lab.verify import check_guest_memory
from tests.waiting import free_port, wait_for

PERIOD = 0.002


def stream(host0: float, guest0: float | None, seq0: int, n: int, delays: list[float] | None = None) -> list[Beat]:
    """n beats every PERIOD from host time host0 (arrival = emission + delay) and guest clock guest0."""
    delays = delays or [0.0005] * n
    return [Beat(host0 + k * PERIOD + delays[k], seq0 + k, None if guest0 is None else guest0 + k * PERIOD)
            for k in range(n)]


def test_guest_clock_that_stands_still_is_timed_by_what_it_lost() -> None:
    """TCG, kvmclock: the guest's clock stops with the VM; the 500 ms show as clock lost, not as a gap."""
    src = stream(100.0, 5.0, 0, 200)                                # last beat emitted at 100.398
    dst = stream(100.9, 5.0 + 200 * PERIOD, 200, 200)               # resumes 500 ms after the stop
    b = blackout(src, dst)
    assert b.ms == pytest.approx(502, abs=1)                        # 500 ms stopped + one period
    assert b.clock_lost_ms == pytest.approx(500, abs=1)
    assert b.guest_gap_ms == pytest.approx(2, abs=0.1)
    assert b.arrival_gap_ms == pytest.approx(502, abs=1)
    assert b.period_ms == pytest.approx(2, abs=0.1)


def test_guest_clock_that_runs_on_is_timed_by_its_gap() -> None:
    src = stream(100.0, 5.0, 0, 200)
    dst = stream(100.9, 5.0 + 200 * PERIOD + 0.5, 200, 200)         # the clock jumped over the 500 ms
    b = blackout(src, dst)
    assert b.ms == pytest.approx(502, abs=1) and b.guest_gap_ms == pytest.approx(502, abs=1)
    assert b.clock_lost_ms == pytest.approx(0, abs=1)


def test_reading_jitter_and_a_backlog_do_not_inflate_the_blackout() -> None:
    """The destination's first 20 beats are read late in one burst (a backlog, the host busy): the
    arrival gap grows by 40 ms, the blackout from the guest's clock does not."""
    src = stream(100.0, 5.0, 0, 200, [0.0005 + 0.003 * (k % 3) for k in range(200)])
    late = [0.040 - k * PERIOD if k < 20 else 0.0005 for k in range(200)]
    dst = stream(100.9, 5.0 + 200 * PERIOD, 200, 200, late)
    b = blackout(src, dst)
    assert b.arrival_gap_ms > 535
    assert b.ms == pytest.approx(502, abs=2)


def test_a_beat_seen_on_both_sides_counts_once() -> None:
    src = stream(100.0, 5.0, 0, 200)
    dst = stream(100.898, 5.0 + 199 * PERIOD, 199, 200)             # seq 199 re-sent by the destination
    assert blackout(src, dst).ms == pytest.approx(502, abs=1)


def test_boot_guest_beats_have_no_clock_the_arrival_gap_is_the_blackout() -> None:
    src = stream(100.0, None, 0, 100)
    dst = stream(100.5, None, 0, 100)
    b = blackout(src, dst)
    assert b.ms == pytest.approx(302, abs=1) and b.guest_gap_ms is None and b.clock_lost_ms is None


def test_too_few_beats() -> None:
    with pytest.raises(LabError, match="heartbeat"):
        blackout(stream(1.0, 1.0, 0, 1), stream(2.0, 2.0, 1, 5))

    class Quiet:
        beats: list[Beat] = []

    class Beating:
        beats = stream(1.0, 1.0, 0, 5)
    assert blackout_ms(Beating(), Quiet()) == math.inf


@pytest.mark.parametrize("fill", image.FILLS)
def test_boot_sector_fills_and_page_heartbeat(fill: str) -> None:
    plain = image.build_boot_sector(256, 5, fill)
    beating = image.build_boot_sector(256, 5, fill, 64)
    assert len(beating) == 512 and beating != plain
    assert struct.pack("<I", 64 * image.PAGE_SIZE - 1) in beating      # test ebx, 64 pages - 1
    assert bytes([0xB0, image.BEAT[0], 0xEE]) in beating                # mov al, ','; out dx, al
    assert bytes([0xB0, image.BEAT[0], 0xEE]) not in plain
    assert (b"\xf3\xab" in plain) == (fill == "compressible")          # rep stosd
    assert image.build_boot_sector(256) == image.build_boot_sector(256, 0, "sparse", 0)


@pytest.mark.parametrize(("fill", "beat_pages"), [("dense", 0), ("sparse", 3), ("sparse", -2),
                                                  ("sparse", 1 << 20)])
def test_boot_sector_bad_fill_or_beat(fill: str, beat_pages: int) -> None:
    with pytest.raises(ValueError):
        image.build_boot_sector(256, 5, fill, beat_pages)


def test_linux_work_knobs() -> None:
    work = LinuxWork("sparse", ws_mib=32, beat_ms=5)
    assert "kvmshell.work=sparse" in work.append() and "kvmshell.beat_ms=5" in work.append()
    with pytest.raises(LabError):
        LinuxWork(beat_ms=-1)


async def migrate(fleet: Fleet, timeout: float = 120.0) -> int:
    """Plain QMP migration src -> dst over loopback; QEMU's downtime (ms)."""
    s, d = fleet.monitor("src"), fleet.monitor("dst")
    port = free_port()
    await d.execute("migrate-incoming", {"uri": f"tcp:127.0.0.1:{port}"})
    await s.execute("migrate", {"uri": f"tcp:127.0.0.1:{port}"})
    info = await wait_for(s.migration, lambda i: i.status.value in ("completed", "failed", "cancelled"),
                          timeout=timeout, every=0.1, what="the migration's end")
    assert info.status.value == "completed", info
    assert info.downtime_ms is not None
    return info.downtime_ms


async def wait_beats(guest: object, count: int, timeout: float = 60.0) -> None:
    async def beats() -> int:
        return len(getattr(guest, "beats"))
    await wait_for(beats, lambda n: n >= count, timeout=timeout, what=f"{count} heartbeats")


@pytest.mark.qemu
@pytest.mark.parametrize("fill", image.FILLS)
async def test_boot_guest_blackout_covers_qemus_downtime(lab: Lab, fill: str) -> None:
    """A paced boot guest (32 pages a tick: a beat every 2 ms) migrated; the memory check passes on
    the destination and the blackout its beats show is at least QEMU's downtime. Under TCG: where
    /dev/kvm is kvm_pvm this 32-bit guest's instructions are emulated one by one, and a full-page
    fill takes seconds a page group (a beat every 2.4 s, measured) against 2.2 ms under TCG. Its RAM
    is padded as the Linux guest's is (QEMU < 9.0 loses TCG stores with 256 KiB-aligned RAM)."""
    ws = 8192
    ram = image.min_ram_mib(ws)
    tcg = dict(accel="tcg", extra_args=("-m", ram_option(ram, "tcg", qemu_version())))
    src = await lab.start("src", MonitorKind.QMP_UNIX, ws_pages=ws, pace=32, fill=fill, beat_pages=64, **tcg)
    dst = await lab.start("dst", MonitorKind.QMP_UNIX, ws_pages=ws, incoming=True, disk=src.disk, **tcg)
    await src.wait_heartbeats(1, timeout=60)
    await wait_beats(src, 20)
    async with Fleet() as fleet:
        fleet.add("src", src.address)
        fleet.add("dst", dst.address)
        await fleet.start()
        downtime = await migrate(fleet)
        await wait_beats(dst, 20)
        await dst.wait_heartbeats(1, timeout=60)
        check = await check_guest_memory(fleet.monitor("dst"), ws, lab.workdir)
    assert check.ok, check.summary()
    b = blackout(src.beats, dst.beats)
    print(f"\nboot guest, {fill}: QEMU downtime {downtime} ms, {b.line()}")
    assert math.isfinite(b.ms) and b.ms < 60_000
    assert b.ms >= downtime - 2 * b.period_ms - 20, b.line()


@pytest.mark.qemu
async def test_linux_guest_blackout_covers_qemus_downtime(lab: Lab) -> None:
    """The Linux guest's sparse workload (a few bytes of each page per pass) migrated under its
    heartbeat; its own check passes on the destination, its blackout covers QEMU's downtime."""
    try:
        parts = await linux_parts()
    except PartsMissing as e:
        pytest.skip(f"Linux lab guest parts missing: {e}")
    work = LinuxWork("sparse", ws_mib=64, rate_mb_s=20)   # paced: converges on a loaded host too
    src = await start_linux(lab, "src", work, parts=parts)
    dst = await start_linux(lab, "dst", work, parts=parts, incoming=True)
    await src.wait_passes(2, timeout=60)
    await wait_beats(src, 50)
    async with Fleet() as fleet:
        fleet.add("src", src.address)
        fleet.add("dst", dst.address)
        await fleet.start()
        downtime = await migrate(fleet)
    await dst.wait_passes(1, timeout=60)
    await wait_beats(dst, 100)
    check = await asyncio.wait_for(dst.check(), 120)
    assert check.ok and check.pages == 64 * 256, check.line
    b = blackout(src.beats, dst.beats)
    print(f"\nLinux guest ({dst.accel}), sparse: QEMU downtime {downtime} ms, {b.line()}")
    assert b.guest_gap_ms is not None and b.clock_lost_ms is not None
    assert math.isfinite(b.ms) and b.ms < 60_000
    assert b.ms >= downtime - 2 * b.period_ms - 20, b.line()
