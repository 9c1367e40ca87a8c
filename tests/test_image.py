"""The memory-dirtying boot sector (kvmshell.lab.image) and its checker (kvmshell.lab.memcheck)."""

from __future__ import annotations

import json
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
    MAX_WS_PAGES,
    PAGE_SIZE,
    PASS_COUNTER_ADDR,
    WS_BASE,
    build_boot_sector,
    min_ram_mib,
    pace_for_rate,
    write_disk_image,
)
from kvmshell.lab.memcheck import MemCheck, check_working_set

# --------------------------------------------------------------------------- image


def test_boot_sector_shape():
    sector = build_boot_sector(256)
    assert len(sector) == 512
    assert sector[510:] == b"\x55\xaa"
    assert sector[0] == 0xFA  # cli
    assert BANNER in sector


def test_parameters_are_embedded():
    base = build_boot_sector(256)
    assert build_boot_sector(256) == base
    assert build_boot_sector(257) != base
    assert build_boot_sector(256, 1000) != base
    assert build_boot_sector(256, 1000) != build_boot_sector(256, 1001)
    # the end of the working set and the pace appear as 32-bit immediates
    assert struct.pack("<I", WS_BASE + 300 * PAGE_SIZE) in build_boot_sector(300)
    assert struct.pack("<I", 0x12345678) in build_boot_sector(1, 0x12345678)
    assert len(build_boot_sector(MAX_WS_PAGES, 2**32 - 1)) == 512


@pytest.mark.parametrize(
    ("ws_pages", "pace"),
    [(0, 0), (-1, 0), (MAX_WS_PAGES + 1, 0), (1, -1), (1, 2**32)],
)
def test_bad_parameters(ws_pages, pace):
    with pytest.raises(ValueError):
        build_boot_sector(ws_pages, pace)


def test_write_disk_image(tmp_path):
    path = tmp_path / "disk.img"
    write_disk_image(path, 16, 5)
    data = path.read_bytes()
    assert len(data) == 1 << 20
    assert data[:512] == build_boot_sector(16, 5)
    assert data[512:] == bytes(len(data) - 512)


def test_min_ram_mib():
    assert min_ram_mib(1) >= 2
    assert min_ram_mib(256) >= 2
    assert min_ram_mib(25600) * (1 << 20) >= WS_BASE + 25600 * PAGE_SIZE
    assert min_ram_mib(25600) < 100 + 1 + 64
    assert min_ram_mib(256 * 100) > min_ram_mib(256)


def test_pace_for_rate():
    assert pace_for_rate(float("inf")) == 0
    slow, fast = pace_for_rate(1e6), pace_for_rate(100e6)
    assert slow > fast > 0
    assert 50 < slow / fast < 150
    with pytest.raises(ValueError):
        pace_for_rate(0)
    with pytest.raises(ValueError):
        pace_for_rate(-1)


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
QEMU_TIMEOUT = 15.0


def _accel() -> str:
    forced = os.environ.get("KVMSHELL_TEST_ACCEL")
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


@pytest.mark.skipif(QEMU is None, reason="qemu-system-x86_64 not installed")
def test_guest_in_qemu(tmp_path):
    ws_pages = 256
    image = tmp_path / "disk.img"
    write_disk_image(image, ws_pages)
    qmp_path = str(tmp_path / "qmp.sock")
    ws_dump = tmp_path / "ws.bin"
    counter_dump = tmp_path / "counter.bin"
    cmd = [
        QEMU, "-machine", "q35", "-accel", _accel(),
        "-display", "none", "-nodefaults", "-m", str(min_ram_mib(ws_pages)),
        "-drive", f"file={image},format=raw,if=ide",
        "-chardev", "stdio,id=s0", "-serial", "chardev:s0",
        "-qmp", f"unix:{qmp_path},server=on,wait=off",
    ]
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL)
    qmp = None
    try:
        deadline = time.monotonic() + QEMU_TIMEOUT
        out = bytearray()

        def three_heartbeats(buf: bytearray) -> bool:
            at = buf.find(BANNER)
            return at >= 0 and buf.count(HEARTBEAT, at + len(BANNER)) >= 3

        _read_until(proc, out, three_heartbeats, deadline)
        qmp = _Qmp(qmp_path, deadline)
        qmp.execute("stop")
        qmp.execute("pmemsave", val=WS_BASE, size=ws_pages * PAGE_SIZE, filename=str(ws_dump))
        qmp.execute("pmemsave", val=PASS_COUNTER_ADDR, size=4, filename=str(counter_dump))
        qmp.execute("cont")

        result = check_working_set(ws_dump.read_bytes())
        assert result.ok, result.summary()
        passes = int.from_bytes(counter_dump.read_bytes(), "little")
        assert passes >= 3
        # v = completed passes (mod 256); when stopped between the last page of a pass and the
        # pass counter increment, all pages are already one ahead of the counter
        allowed = {passes % 256, (passes + 1) % 256} if result.boundary == 0 else {passes % 256}
        assert result.value in allowed
    finally:
        if qmp is not None:
            qmp.close()
        proc.kill()
        proc.wait()
        proc.stdout.close()
