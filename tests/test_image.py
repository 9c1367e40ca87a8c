"""The memory-dirtying boot sector (kvmshell.lab.image) and its checker (kvmshell.lab.memcheck)."""

from __future__ import annotations

import contextlib
import json
import math
import os
import select
import shutil
import socket
import struct
import subprocess
import time

import pytest

from kvmshell.lab.image import (
    BANNER,
    HEARTBEAT,
    MARKER,
    MAX_PACE,
    MAX_WS_PAGES,
    PAGE_SIZE,
    PASS_COUNTER_ADDR,
    PIT_DIVISOR,
    PIT_HZ,
    TICK_HZ,
    WS_BASE,
    build_boot_sector,
    min_ram_mib,
    pace_for_rate,
    rate_for_pace,
    write_disk_image,
)
from kvmshell.lab.memcheck import MemCheck, check_working_set

# --------------------------------------------------------------------------- image


@pytest.mark.parametrize(("ws_pages", "pace"), [(256, 0), (256, 5), (0, 0), (MAX_WS_PAGES, MAX_PACE)])
def test_boot_sector_shape(ws_pages, pace):
    sector = build_boot_sector(ws_pages, pace)
    assert len(sector) == 512
    assert sector[510:] == b"\x55\xaa"
    assert sector[0] == 0xFA  # cli
    assert BANNER in sector
    assert b"\x0f\x01\x1d" in sector  # lidt [disp32]: every variant has an IDT


def test_parameters_are_embedded():
    base = build_boot_sector(256)
    assert build_boot_sector(256) == base
    assert build_boot_sector(256, 0) == base
    assert build_boot_sector(257) != base
    assert build_boot_sector(256, 5) != base
    assert build_boot_sector(256, 5) != build_boot_sector(256, 6)
    # the end of the working set and the pace appear as 32-bit immediates
    assert struct.pack("<I", WS_BASE + 300 * PAGE_SIZE) in build_boot_sector(300)
    assert struct.pack("<I", 0x12345678) in build_boot_sector(1, 0x12345678)


STI_HLT_CLI = b"\xfb\xf4\xfa"
PIT_SETUP = bytes([0xB0, 0x34, 0xE6, 0x43, 0xB0, PIT_DIVISOR & 0xFF, 0xE6, 0x40,
                   0xB0, PIT_DIVISOR >> 8, 0xE6, 0x40])
PIC_MASKS = b"\xb0\xfe\xe6\x21\xb0\xff\xe6\xa1"
IDLE_LOOP = b"\xf4\xeb\xfd"  # hlt; jmp $-1


def test_paced_and_unpaced_code():
    paced, unpaced = build_boot_sector(64, 3), build_boot_sector(64)
    assert round(PIT_HZ / PIT_DIVISOR) == TICK_HZ
    for needle in (STI_HLT_CLI, PIT_SETUP, PIC_MASKS):
        assert needle in paced
        assert needle not in unpaced  # unpaced: no timer, interrupts never enabled
    assert b"\xf4" not in unpaced[:unpaced.index(BANNER)]  # no hlt at all
    assert IDLE_LOOP not in paced and IDLE_LOOP not in unpaced


def test_idle_guest_sector():
    idle = build_boot_sector(0)
    assert build_boot_sector(0, 7) == idle  # pace is meaningless without a working set
    assert IDLE_LOOP in idle
    code = idle[:idle.index(BANNER)]
    assert b"\xb0\x2e\xee" not in code  # no heartbeat
    assert b"\xfb" not in code  # no sti: the idle hlt is never woken by the timer
    assert PIT_SETUP not in code


@pytest.mark.parametrize(
    ("ws_pages", "pace"),
    [(-1, 0), (MAX_WS_PAGES + 1, 0), (1, -1), (1, MAX_PACE + 1), (0, -1)],
)
def test_bad_parameters(ws_pages, pace):
    with pytest.raises(ValueError):
        build_boot_sector(ws_pages, pace)


@pytest.mark.parametrize(("ws_pages", "pace"), [(1.0, 0), (True, 0), (1, 2.0), (1, None)])
def test_parameter_types(ws_pages, pace):
    with pytest.raises(TypeError):
        build_boot_sector(ws_pages, pace)


def test_write_disk_image(tmp_path):
    path = tmp_path / "disk.img"
    write_disk_image(path, 16, 5)
    data = path.read_bytes()
    assert len(data) == 1 << 20
    assert data[:512] == build_boot_sector(16, 5)
    assert data[512:] == bytes(len(data) - 512)
    write_disk_image(path, 0)
    assert path.read_bytes()[:512] == build_boot_sector(0)


def test_min_ram_mib():
    assert min_ram_mib(0) >= 2
    assert min_ram_mib(1) >= 2
    assert min_ram_mib(256) >= 2
    assert min_ram_mib(25600) * (1 << 20) >= WS_BASE + 25600 * PAGE_SIZE
    assert min_ram_mib(25600) < 100 + 1 + 64
    assert min_ram_mib(256 * 100) > min_ram_mib(256)
    with pytest.raises(ValueError):
        min_ram_mib(-1)


def test_pace_for_rate():
    step = PAGE_SIZE * TICK_HZ  # bytes/s per unit of pace
    assert pace_for_rate(float("inf")) == 0
    assert pace_for_rate(20e6) == 5
    assert pace_for_rate(100e6) == 24
    assert pace_for_rate(102.4e6) == 25
    assert pace_for_rate(2.4 * step) == 2
    assert pace_for_rate(2.6 * step) == 3
    assert pace_for_rate(2.5 * step) == 3  # halves round up
    assert pace_for_rate(1.0) == 1  # any positive rate runs
    assert pace_for_rate(1e-300) == 1
    assert pace_for_rate(1e300) == MAX_PACE
    for bad in (0, -1, -math.inf, math.nan):
        with pytest.raises(ValueError):
            pace_for_rate(bad)


def test_rate_for_pace():
    assert rate_for_pace(0) == math.inf
    assert rate_for_pace(1) == PAGE_SIZE * TICK_HZ
    assert rate_for_pace(5) == pytest.approx(20.48e6)
    for pace in (1, 2, 5, 25, 1000, MAX_PACE):
        assert pace_for_rate(rate_for_pace(pace)) == pace
    with pytest.raises(ValueError):
        rate_for_pace(-1)
    with pytest.raises(TypeError):
        rate_for_pace(1.5)


# --------------------------------------------------------------------------- checker


def make_dump(counters, base=WS_BASE) -> bytearray:
    data = bytearray(len(counters) * PAGE_SIZE)
    for i, c in enumerate(counters):
        off = i * PAGE_SIZE
        data[off] = c % 256
        data[off + 1] = MARKER
        data[off + 4:off + 8] = (base + off).to_bytes(4, "little")
    return data


@pytest.mark.parametrize(
    ("counters", "value", "boundary"),
    [
        ([7] * 10, 7, 0),  # all equal
        ([8] * 3 + [7] * 7, 7, 3),
        ([8] * 9 + [7], 7, 9),
        ([0] * 4 + [255] * 6, 255, 4),  # wrap: v = 255, v+1 = 0
        ([0] * 5, 0, 0),
        ([1], 1, 0),
    ],
)
def test_checker_accepts_valid(counters, value, boundary):
    result = check_working_set(bytes(make_dump(counters)))
    assert result == MemCheck(True, len(counters), value, boundary, ())
    assert result.summary().startswith("ok")


def test_checker_other_base():
    base = 0x200000
    assert check_working_set(bytes(make_dump([3, 2, 2], base)), base).ok
    assert not check_working_set(bytes(make_dump([3, 2, 2], base))).ok


def test_checker_rejects_zero_page():
    data = make_dump([8] * 20 + [7] * 30)
    data[17 * PAGE_SIZE:18 * PAGE_SIZE] = bytes(PAGE_SIZE)
    result = check_working_set(bytes(data))
    assert not result.ok
    assert result.bad_pages == 1
    assert result.problems[0].startswith("page 17 (0x111000):")
    assert (result.value, result.boundary) == (7, 20)


def test_checker_rejects_stale_counter():
    data = make_dump([8] * 20 + [7] * 30)
    data[40 * PAGE_SIZE] = 6  # v - 1: a page from the pass before
    result = check_working_set(bytes(data))
    assert not result.ok
    assert len(result.problems) == 1
    assert "page 40 (0x128000): counter 6, expected 7 or 8" in result.problems[0]


def test_checker_rejects_stale_counter_at_wrap():
    data = make_dump([0] * 5 + [255] * 5)
    data[7 * PAGE_SIZE] = 254
    result = check_working_set(bytes(data))
    assert not result.ok
    assert "page 7 " in result.problems[0]
    assert "counter 254, expected 255 or 0" in result.problems[0]


def test_checker_rejects_wrong_address():
    data = make_dump([5] * 8)
    data[3 * PAGE_SIZE + 4:3 * PAGE_SIZE + 8] = (WS_BASE + 4 * PAGE_SIZE).to_bytes(4, "little")
    result = check_working_set(bytes(data))
    assert not result.ok
    assert "page 3 (0x103000)" in result.problems[0]
    assert "address 0x00104000" in result.problems[0]


def test_checker_rejects_missing_marker():
    data = make_dump([5] * 8)
    data[PAGE_SIZE * 7 + 1] = 0
    result = check_working_set(bytes(data))
    assert not result.ok
    assert result.problems == ("page 7 (0x107000): marker 0x00, expected 0x5a",)


def test_checker_rejects_two_boundaries():
    result = check_working_set(bytes(make_dump([8] * 5 + [7] * 5 + [8] * 5 + [7] * 5)))
    assert not result.ok
    assert "out of order" in result.problems[0]
    # wrong direction: the leading pages may only be one ahead, not one behind
    assert not check_working_set(bytes(make_dump([7] * 5 + [8] * 5))).ok
    # three distinct values
    assert not check_working_set(bytes(make_dump([9] * 2 + [8] * 2 + [7] * 2))).ok


def test_checker_limits_problems():
    result = check_working_set(bytes(50 * PAGE_SIZE))
    assert not result.ok
    assert result.bad_pages == 50
    assert len(result.problems) == 10
    assert "50 of 50" in result.summary()


def test_checker_bad_length():
    with pytest.raises(ValueError):
        check_working_set(bytes(PAGE_SIZE + 1))
    assert not check_working_set(b"").ok


# --------------------------------------------------------------------------- real QEMU

QEMU = shutil.which("qemu-system-x86_64")
QEMU_TIMEOUT = 60.0
"""Upper bound for a guest to boot and print what a test waits for. Generous: under the slow
kvm_pvm flavour of KVM, SeaBIOS alone takes ~3 s of a full core, and tests run many guests."""


def needs_qemu(test):
    """Marks a test that starts real QEMU guests (skipped when QEMU is missing)."""
    return pytest.mark.qemu(pytest.mark.skipif(QEMU is None, reason="qemu-system-x86_64 not installed")(test))


_CLK_TCK = os.sysconf("SC_CLK_TCK")


def _accel() -> str:
    """KVMSHELL_ACCEL=kvm|tcg forces one; otherwise KVM when /dev/kvm opens, else TCG."""
    forced = os.environ.get("KVMSHELL_ACCEL", "").strip().lower()
    if forced:
        return forced
    try:
        fd = os.open("/dev/kvm", os.O_RDWR)
    except OSError:
        return "tcg"
    os.close(fd)
    return "kvm"


class _Qmp:
    def __init__(self, path: str, deadline: float) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(max(0.1, deadline - time.monotonic()))
        self.sock.connect(path)
        self.file = self.sock.makefile("rb")
        greeting = json.loads(self.file.readline())
        assert "QMP" in greeting
        self.execute("qmp_capabilities")

    def execute(self, command: str, **arguments):
        msg = {"execute": command}
        if arguments:
            msg["arguments"] = arguments
        self.sock.sendall(json.dumps(msg).encode() + b"\n")
        while True:
            line = self.file.readline()
            if not line:
                raise ConnectionError("QMP closed")
            reply = json.loads(line)
            if "event" in reply:
                continue
            if "error" in reply:
                raise RuntimeError(f"{command}: {reply['error']}")
            return reply["return"]

    def close(self) -> None:
        self.file.close()
        self.sock.close()


def _read_until(proc: subprocess.Popen, buf: bytearray, done, deadline: float) -> None:
    fd = proc.stdout.fileno()
    while not done(buf):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise AssertionError(f"timed out waiting for guest output; got {bytes(buf[-200:])!r}")
        ready, _, _ = select.select([fd], [], [], remaining)
        if ready:
            chunk = os.read(fd, 65536)
            if not chunk:
                raise AssertionError(f"QEMU exited (rc={proc.wait()}); output {bytes(buf[-200:])!r}")
            buf += chunk


def _drain(proc: subprocess.Popen, buf: bytearray) -> None:
    """Append whatever guest output is ready now, without blocking."""
    fd = proc.stdout.fileno()
    while select.select([fd], [], [], 0)[0]:
        chunk = os.read(fd, 65536)
        if not chunk:
            return
        buf += chunk


def _cpu_seconds(pid: int) -> float:
    """utime + stime of a process, all threads (vCPUs included)."""
    with open(f"/proc/{pid}/stat", encoding="ascii") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK


class _Guest:
    """A running QEMU with the image guest, its serial output and (once connected) QMP."""

    def __init__(self, tmp_path, ws_pages: int, pace: int) -> None:
        self.ws_pages = ws_pages
        self.tmp_path = tmp_path
        image = tmp_path / "disk.img"
        write_disk_image(image, ws_pages, pace)
        self.qmp_path = str(tmp_path / "qmp.sock")
        cmd = [
            QEMU, "-machine", "q35", "-accel", _accel(),
            "-display", "none", "-nodefaults", "-m", str(min_ram_mib(ws_pages)),
            "-drive", f"file={image},format=raw,if=ide",
            "-chardev", "stdio,id=s0", "-serial", "chardev:s0",
            "-qmp", f"unix:{self.qmp_path},server=on,wait=off",
        ]
        self.started = time.monotonic()
        self.deadline = self.started + QEMU_TIMEOUT
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL)
        self.out = bytearray()
        self.qmp: _Qmp | None = None

    def wait_output(self, done) -> None:
        _read_until(self.proc, self.out, done, self.deadline)

    def connect(self) -> _Qmp:
        if self.qmp is None:
            self.qmp = _Qmp(self.qmp_path, self.deadline)
        return self.qmp

    def read_mem(self, addr: int, size: int) -> bytes:
        path = self.tmp_path / "mem.bin"
        self.connect().execute("pmemsave", val=addr, size=size, filename=str(path))
        return path.read_bytes()

    def snapshot(self):
        """Pause, read the pass counter and the working set, check the set, resume. Returns
        (passes, check result, pages dirtied since the banner)."""
        qmp = self.connect()
        qmp.execute("stop")
        try:
            passes = int.from_bytes(self.read_mem(PASS_COUNTER_ADDR, 4), "little")
            result = check_working_set(self.read_mem(WS_BASE, self.ws_pages * PAGE_SIZE))
        finally:
            qmp.execute("cont")
        assert result.ok, result.summary()
        # v = completed passes (mod 256); when stopped between the last page of a pass and the
        # pass counter increment, all pages are already one ahead of the counter
        if result.boundary == 0 and result.value == (passes + 1) % 256:
            done = (passes + 1) * self.ws_pages
        else:
            assert result.value == passes % 256, (passes, result.summary())
            done = passes * self.ws_pages + result.boundary
        return passes, result, done

    def close(self) -> None:
        try:
            if self.qmp is not None:
                self.qmp.close()
        finally:
            self.proc.kill()
            self.proc.wait()
            self.proc.stdout.close()


@contextlib.contextmanager
def _guest(tmp_path, ws_pages: int, pace: int = 0):
    guest = _Guest(tmp_path, ws_pages, pace)
    try:
        yield guest
    finally:
        guest.close()


def _heartbeats(n: int):
    def done(buf: bytearray) -> bool:
        at = buf.find(BANNER)
        return at >= 0 and buf.count(HEARTBEAT, at + len(BANNER)) >= n
    return done


def _dirty_rate_check(guest: _Guest, pace: int, interval: float = 0.5) -> tuple[int, float, float]:
    """Pages dirtied, wall seconds and QEMU CPU seconds over about ``interval`` seconds."""
    t0 = time.monotonic()
    cpu0 = _cpu_seconds(guest.proc.pid)
    _, _, done0 = guest.snapshot()
    time.sleep(interval)
    _, _, done1 = guest.snapshot()
    cpu1 = _cpu_seconds(guest.proc.pid)
    return done1 - done0, time.monotonic() - t0, cpu1 - cpu0


@needs_qemu
@pytest.mark.parametrize(("ws_pages", "pace"), [(256, 0), (64, 2)], ids=["unpaced", "paced"])
def test_guest_in_qemu(tmp_path, ws_pages, pace):
    with _guest(tmp_path, ws_pages, pace) as guest:
        guest.wait_output(_heartbeats(3))
        passes, _, _ = guest.snapshot()
        assert passes >= 3
        if not pace:
            return
        # A paced guest dirties at most pace pages per timer tick and sleeps in between: over
        # an interval it stays under a generous bound (an unpaced guest exceeds it a hundredfold)
        # and its QEMU uses well under a core (an unpaced or busy-waiting one uses all of it).
        # At most pace pages per hlt and one hlt per tick; ticks that KVM re-injects late can
        # come in a burst, hence the factor 2.
        pages, elapsed, cpu = _dirty_rate_check(guest, pace)
        ticks = elapsed * PIT_HZ / PIT_DIVISOR
        assert 0 < pages <= 2 * pace * (ticks + 2), (pages, elapsed)
        assert cpu / elapsed < 0.5, f"paced guest used {cpu / elapsed:.0%} of a core"


@needs_qemu
def test_idle_guest_in_qemu(tmp_path):
    with _guest(tmp_path, 0) as guest:
        guest.wait_output(lambda buf: BANNER in buf)
        qmp = guest.connect()
        cpu0, t0 = _cpu_seconds(guest.proc.pid), time.monotonic()
        time.sleep(0.3)
        cpu1, elapsed = _cpu_seconds(guest.proc.pid), time.monotonic() - t0
        assert qmp.execute("query-status")["status"] == "running"
        registers = qmp.execute("human-monitor-command", **{"command-line": "info registers"})
        assert "HLT=1" in registers
        assert guest.read_mem(PASS_COUNTER_ADDR, 4) == bytes(4)
        _drain(guest.proc, guest.out)
        assert guest.out.split(BANNER, 1)[1] == b""  # no heartbeat
        assert (cpu1 - cpu0) / elapsed < 0.5, f"idle guest used {(cpu1 - cpu0) / elapsed:.0%} of a core"
