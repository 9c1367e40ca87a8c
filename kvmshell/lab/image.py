"""A tiny bootable x86 disk image whose only job is to dirty guest memory.

The image is a single 512-byte boot sector, assembled here byte by byte (no
assembler, no blob: every emitted instruction sits on its own line with its
mnemonic in the comment). SeaBIOS loads it at 0000:7C00 and jumps to it.

What the guest does:

1. Real mode: ``cli``, normalise CS to 0, zero DS/SS, set SP, open A20 through
   port 0x92 ("fast A20"), ``lgdt`` a flat 3-entry GDT (null, 0x08 = 32-bit
   code, 0x10 = 32-bit data, both base 0 limit 4 GiB), set CR0.PE and far-jump
   into 32-bit code.
2. Protected mode: DS/ES/SS = 0x10, ESP = 0x7C00, pass counter at
   ``PASS_COUNTER_ADDR`` zeroed, and every page of the working set initialised
   (counter 0, ``MARKER``, own address): RAM is not necessarily zero at this
   point, SeaBIOS relocates its init code to top-of-RAM minus 16 MiB, which can
   fall inside the working set. From the banner on, the working set is valid.
3. Banner ``KVMSHELL-GUEST\\n`` on COM1 (plain ``out`` to 0x3F8; QEMU's UART
   needs no initialisation to transmit).
4. Forever: walk the working set (``ws_pages`` pages of 4 KiB from
   ``WS_BASE`` = 1 MiB) in ascending order; on each page at address A write
   ``MARKER`` at A+1, the dword A at A+4, then ``inc byte [A]``; optionally
   busy-wait ``pace_ticks`` TSC ticks (low 32 bits of ``rdtsc``, with
   ``pause``). After each full pass: ``inc dword [PASS_COUNTER_ADDR]`` and a
   ``.`` heartbeat on COM1.

The marker and address are rewritten on every pass (so a page that a migration
zeroes or misplaces stays detectable) before the counter is incremented. At
any instruction boundary after the banner the dump is accepted by
:func:`kvmshell.lab.memcheck.check_working_set`: the counters are
``[v+1]*k + [v]*(n-k)`` (mod 256), where v is the number of completed passes
mod 256 and k the number of pages done in the current pass (right after the
last page of a pass all pages read v+1 while the pass counter still reads v).

Check the bytes with objdump (the 16-bit part is offsets 0..0x2d)::

    objdump -D -b binary -m i8086 --start-address=0 --stop-address=0x2e disk.img
    objdump -D -b binary -m i386 --start-address=0x2e disk.img
"""

from __future__ import annotations

import math
import os
import re
import struct

PAGE_SIZE = 4096
WS_BASE = 0x100000
MARKER = 0x5A
PASS_COUNTER_ADDR = 0x600
BANNER = b"KVMSHELL-GUEST\n"
HEARTBEAT = b"."

LOAD_ADDR = 0x7C00
"""Where the BIOS loads the boot sector (and where the guest's stack starts, growing down)."""
SECTOR_SIZE = 512
DISK_IMAGE_SIZE = 1 << 20
"""The raw image: boot sector padded with zeros to 1 MiB."""
WS_LIMIT = 0x80000000
"""The working set must end at or below 2 GiB: all of it is then plain RAM below the PCI hole
(q35 and pc keep RAM below 4 GiB up to at least 2 GiB) and every address fits in 32 bits."""
MAX_WS_PAGES = (WS_LIMIT - WS_BASE) // PAGE_SIZE
RAM_HEADROOM_MIB = 8
"""Extra guest RAM above the working set: SeaBIOS keeps its final tables (a few hundred KiB) and
the ACPI tables at the top of low RAM."""
DEFAULT_TSC_HZ = 2.5e9

_COM1 = 0x3F8
_CODE_SEL = 0x08
_DATA_SEL = 0x10


# --------------------------------------------------------------------------- emitting helpers


def _u8(value: int) -> bytes:
    return struct.pack("<B", value & 0xFF)


def _u16(value: int) -> bytes:
    return struct.pack("<H", value & 0xFFFF)


def _u32(value: int) -> bytes:
    return struct.pack("<I", value & 0xFFFFFFFF)


class _Code:
    """Bytes being assembled at a known load address."""

    def __init__(self, origin: int) -> None:
        self.origin = origin
        self.buf = bytearray()

    def here(self) -> int:
        """Address of the next byte to be emitted."""
        return self.origin + len(self.buf)

    def emit(self, *parts: int | bytes) -> None:
        for part in parts:
            self.buf += bytes([part]) if isinstance(part, int) else part

    def rel8(self, target: int) -> bytes:
        """Displacement byte of a 2-byte short jump (opcode, rel8) about to be emitted at here()."""
        disp = target - (self.here() + 2)
        if not -128 <= disp <= 127:
            raise AssertionError(f"short jump out of range: {disp}")
        return _u8(disp)


def _assemble(ws_pages: int, pace_ticks: int, labels: dict[str, int]) -> tuple[bytes, dict[str, int]]:
    """One assembly pass. ``labels`` holds the addresses found by the previous pass (for forward
    references); instruction sizes never depend on label values, so two passes are enough."""
    found: dict[str, int] = {}
    ws_end = WS_BASE + ws_pages * PAGE_SIZE
    a = _Code(LOAD_ADDR)

    # ---- 16-bit real mode, CS:IP = 0000:7C00 (or 07C0:0000 on odd BIOSes) -------------------
    a.emit(0xFA)                                          # cli
    a.emit(0xEA, _u16(labels["start16"]), _u16(0))        # jmp 0x0000:start16  (CS = 0)
    found["start16"] = a.here()
    a.emit(0x31, 0xC0)                                    # xor ax, ax
    a.emit(0x8E, 0xD8)                                    # mov ds, ax
    a.emit(0x8E, 0xD0)                                    # mov ss, ax
    a.emit(0xBC, _u16(LOAD_ADDR))                         # mov sp, 0x7c00
    a.emit(0xE4, 0x92)                                    # in al, 0x92
    a.emit(0x0C, 0x02)                                    # or al, 0x02      (A20 on)
    a.emit(0x24, 0xFE)                                    # and al, 0xfe     (never the reset bit)
    a.emit(0xE6, 0x92)                                    # out 0x92, al
    a.emit(0x0F, 0x01, 0x16, _u16(labels["gdt_desc"]))    # lgdt [gdt_desc]
    a.emit(0x0F, 0x20, 0xC0)                              # mov eax, cr0
    a.emit(0x66, 0x83, 0xC8, 0x01)                        # or eax, 1        (CR0.PE)
    a.emit(0x0F, 0x22, 0xC0)                              # mov cr0, eax
    a.emit(0x66, 0xEA, _u32(labels["pm32"]), _u16(_CODE_SEL))  # jmp dword 0x08:pm32

    # ---- 32-bit protected mode ---------------------------------------------------------------
    found["pm32"] = a.here()
    a.emit(0x66, 0xB8, _u16(_DATA_SEL))                   # mov ax, 0x10
    a.emit(0x8E, 0xD8)                                    # mov ds, ax
    a.emit(0x8E, 0xC0)                                    # mov es, ax
    a.emit(0x8E, 0xD0)                                    # mov ss, ax
    a.emit(0xBC, _u32(LOAD_ADDR))                         # mov esp, 0x7c00
    a.emit(0xFC)                                          # cld
    a.emit(0xC7, 0x05, _u32(PASS_COUNTER_ADDR), _u32(0))  # mov dword [0x600], 0

    # initialise every page: counter 0, MARKER, own address (RAM may hold firmware leftovers)
    a.emit(0xBB, _u32(WS_BASE))                           # mov ebx, WS_BASE
    found["init_loop"] = a.here()
    a.emit(0xC7, 0x03, _u32(MARKER << 8))                 # mov dword [ebx], MARKER << 8
    a.emit(0x89, 0x5B, 0x04)                              # mov [ebx+4], ebx
    a.emit(0x81, 0xC3, _u32(PAGE_SIZE))                   # add ebx, 0x1000
    a.emit(0x81, 0xFB, _u32(ws_end))                      # cmp ebx, WS_BASE + ws_pages*0x1000
    a.emit(0x72, a.rel8(found["init_loop"]))              # jb init_loop

    # banner: ecx bytes from esi to COM1
    a.emit(0xBE, _u32(labels["banner"]))                  # mov esi, banner
    a.emit(0xB9, _u32(len(BANNER)))                       # mov ecx, len(BANNER)
    a.emit(0x66, 0xBA, _u16(_COM1))                       # mov dx, 0x3f8
    found["banner_loop"] = a.here()
    a.emit(0xAC)                                          # lodsb
    a.emit(0xEE)                                          # out dx, al
    a.emit(0xE2, a.rel8(found["banner_loop"]))            # loop banner_loop

    # one pass over the working set; ebx = page address
    found["pass_loop"] = a.here()
    a.emit(0xBB, _u32(WS_BASE))                           # mov ebx, WS_BASE
    found["page_loop"] = a.here()
    a.emit(0xC6, 0x43, 0x01, _u8(MARKER))                 # mov byte [ebx+1], MARKER
    a.emit(0x89, 0x5B, 0x04)                              # mov [ebx+4], ebx
    a.emit(0xFE, 0x03)                                    # inc byte [ebx]
    if pace_ticks:
        # busy-wait until the low 32 bits of the TSC moved pace_ticks past the page write
        # (unsigned difference, so TSC wrap is harmless); rdtsc clobbers edx:eax
        a.emit(0x0F, 0x31)                                # rdtsc
        a.emit(0x89, 0xC6)                                # mov esi, eax
        found["pace_loop"] = a.here()
        a.emit(0xF3, 0x90)                                # pause
        a.emit(0x0F, 0x31)                                # rdtsc
        a.emit(0x29, 0xF0)                                # sub eax, esi
        a.emit(0x3D, _u32(pace_ticks))                    # cmp eax, pace_ticks
        a.emit(0x72, a.rel8(found["pace_loop"]))          # jb pace_loop
    a.emit(0x81, 0xC3, _u32(PAGE_SIZE))                   # add ebx, 0x1000
    a.emit(0x81, 0xFB, _u32(ws_end))                      # cmp ebx, WS_BASE + ws_pages*0x1000
    a.emit(0x72, a.rel8(found["page_loop"]))              # jb page_loop
    a.emit(0xFF, 0x05, _u32(PASS_COUNTER_ADDR))           # inc dword [0x600]
    a.emit(0x66, 0xBA, _u16(_COM1))                       # mov dx, 0x3f8
    a.emit(0xB0, HEARTBEAT[0])                            # mov al, '.'
    a.emit(0xEE)                                          # out dx, al
    a.emit(0xEB, a.rel8(found["pass_loop"]))              # jmp pass_loop

    # ---- data --------------------------------------------------------------------------------
    found["banner"] = a.here()
    a.emit(BANNER)                                        # db "KVMSHELL-GUEST", 10
    while a.here() % 8:
        a.emit(0x00)                                      # db 0  (align the GDT to 8)
    found["gdt"] = a.here()
    a.emit(bytes(8))                                      # 0x00: null descriptor
    a.emit(0xFF, 0xFF, 0x00, 0x00, 0x00, 0x9A, 0xCF, 0x00)  # 0x08: code, base 0, limit 4 GiB, 32-bit, ring 0, exec/read
    a.emit(0xFF, 0xFF, 0x00, 0x00, 0x00, 0x92, 0xCF, 0x00)  # 0x10: data, base 0, limit 4 GiB, 32-bit, ring 0, read/write
    found["gdt_desc"] = a.here()
    a.emit(_u16(3 * 8 - 1), _u32(found["gdt"]))           # dw gdt_limit; dd gdt
    return bytes(a.buf), found


def _check_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    return value


def build_boot_sector(ws_pages: int, pace_ticks: int = 0) -> bytes:
    """The 512-byte boot sector dirtying ``ws_pages`` pages from ``WS_BASE``.

    ``pace_ticks`` is the TSC ticks to wait after each page (0: no pacing code at all).
    """
    _check_int("ws_pages", ws_pages)
    _check_int("pace_ticks", pace_ticks)
    if not 1 <= ws_pages <= MAX_WS_PAGES:
        raise ValueError(f"ws_pages must be in 1..{MAX_WS_PAGES}, got {ws_pages}")
    if not 0 <= pace_ticks < 2**32:
        raise ValueError(f"pace_ticks must be in 0..2**32-1, got {pace_ticks}")
    labels = dict.fromkeys(("start16", "pm32", "banner", "gdt_desc"), LOAD_ADDR)
    _, labels = _assemble(ws_pages, pace_ticks, labels)
    code, final = _assemble(ws_pages, pace_ticks, labels)
    assert final == labels, "label addresses moved between passes"
    if len(code) > SECTOR_SIZE - 2:
        raise AssertionError(f"boot sector code too large: {len(code)} bytes")
    return code + bytes(SECTOR_SIZE - 2 - len(code)) + b"\x55\xAA"


def write_disk_image(path: str | os.PathLike[str], ws_pages: int, pace_ticks: int = 0) -> None:
    """Write a raw disk image: the boot sector, then zeros up to 1 MiB."""
    sector = build_boot_sector(ws_pages, pace_ticks)
    with open(path, "wb") as f:
        f.write(sector)
        f.write(bytes(DISK_IMAGE_SIZE - len(sector)))


def min_ram_mib(ws_pages: int) -> int:
    """Smallest guest RAM (MiB) holding ``WS_BASE`` + the working set, rounded up, plus headroom."""
    _check_int("ws_pages", ws_pages)
    if not 1 <= ws_pages <= MAX_WS_PAGES:
        raise ValueError(f"ws_pages must be in 1..{MAX_WS_PAGES}, got {ws_pages}")
    end = WS_BASE + ws_pages * PAGE_SIZE
    return -(-end // (1 << 20)) + RAM_HEADROOM_MIB


def host_tsc_hz(cpuinfo_path: str = "/proc/cpuinfo") -> float:
    """Best guess of the host TSC frequency: the nominal '@ x.xxGHz' of the model name (the TSC
    rate on Intel), else the first 'cpu MHz', else 2.5 GHz. Under KVM the guest TSC runs at
    the host rate."""
    try:
        with open(cpuinfo_path, encoding="utf-8", errors="replace") as f:
            text = f.read()
    except OSError:
        return DEFAULT_TSC_HZ
    m = re.search(r"^model name\s*:.*@\s*([0-9]+(?:\.[0-9]+)?)\s*GHz", text, re.MULTILINE)
    if m and float(m.group(1)) > 0:
        return float(m.group(1)) * 1e9
    m = re.search(r"^cpu MHz\s*:\s*([0-9]+(?:\.[0-9]+)?)", text, re.MULTILINE)
    if m and float(m.group(1)) > 0:
        return float(m.group(1)) * 1e6
    return DEFAULT_TSC_HZ


def pace_for_rate(bytes_per_second: float) -> int:
    """TSC ticks per page for a target dirty rate (bytes/s); 0 (unpaced) for an infinite rate.

    The wait covers only the time after each page write, so the real rate is a little below
    the target (loop overhead); clamped to 1..2**32-1.
    """
    if math.isnan(bytes_per_second) or bytes_per_second <= 0:
        raise ValueError(f"bytes_per_second must be > 0, got {bytes_per_second}")
    if math.isinf(bytes_per_second):
        return 0
    ticks = host_tsc_hz() * PAGE_SIZE / bytes_per_second
    return max(1, min(2**32 - 1, round(ticks)))
