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
3. An IDT of ``IDT_ENTRIES`` interrupt gates is built at ``IDT_ADDR`` and
   loaded, all gates pointing at one handler that sends a non-specific EOI to
   the master PIC and returns with every register kept (an NMI is survived too).
   A paced guest (``pace`` > 0) then masks every IRQ but IRQ0 (SeaBIOS leaves
   it on vector 8, which is fine when every gate is the same) and programs PIT
   channel 0 to ``TICK_HZ`` (mode 2, divisor ``PIT_DIVISOR``). Interrupts stay
   disabled (IF = 0) everywhere except in the pacing ``hlt``.
4. Banner ``KVMSHELL-GUEST\\n`` on COM1 (plain ``out`` to 0x3F8; QEMU's UART
   needs no initialisation to transmit).
5. Forever: walk the working set (``ws_pages`` pages of 4 KiB from
   ``WS_BASE`` = 1 MiB) in ascending order; on each page at address A write
   ``MARKER`` at A+1, the dword A at A+4, then the page's body from A+8 as ``fill`` says
   (:data:`FILLS`: ``sparse`` leaves it alone, so only those bytes change per pass;
   ``compressible`` writes one dword (pass counter xor A) over it with ``rep stosd``;
   ``incompressible`` writes an xorshift32 stream that runs on across pages and passes), then
   ``inc byte [A]``; with ``beat_pages`` (a power of two) a ``,`` heartbeat on COM1 after every
   ``beat_pages`` pages (:mod:`kvmshell.lab.blackout` times a migration's blackout from their
   arrival; the ``.`` per pass is too rare for that); when paced,
   after every ``pace`` pages ``sti; hlt; cli``: sleep until the next timer
   tick (or return at once if a tick fell while dirtying, so a guest that
   cannot keep its pace is not slowed further). After each full pass:
   ``inc dword [PASS_COUNTER_ADDR]`` and a ``.`` heartbeat on COM1.
   With ``ws_pages`` = 0 (an idle guest) there is no working set: after the
   banner, ``hlt`` in a loop with interrupts disabled, no heartbeats.

The nominal dirty rate of a paced guest is ``pace * PAGE_SIZE * TICK_HZ``
bytes/s (:func:`rate_for_pace`; 1 page per tick is 4.1 MB/s). Between ticks
the vCPU sleeps in ``hlt``, so a slow guest costs the host little CPU; an
unpaced one (``pace`` = 0: no timer, no ``hlt``) runs flat out.

The marker and address are rewritten on every pass (so a page that a migration
zeroes or misplaces stays detectable) before the counter is incremented. At
any instruction boundary after the banner the dump is accepted by
:func:`kvmshell.lab.memcheck.check_working_set`: the counters are
``[v+1]*k + [v]*(n-k)`` (mod 256), where v is the number of completed passes
mod 256 and k the number of pages done in the current pass (right after the
last page of a pass all pages read v+1 while the pass counter still reads v).

Check the bytes with objdump (the 16-bit part is offsets 0..0x2d; the 32-bit
listing turns into nonsense at the banner, after the interrupt handler)::

    objdump -D -b binary -m i8086 --start-address=0 --stop-address=0x2e disk.img
    objdump -D -b binary -m i386 --start-address=0x2e disk.img
"""

from __future__ import annotations

import math
import os
import struct

PAGE_SIZE = 4096
WS_BASE = 0x100000
MARKER = 0x5A
PASS_COUNTER_ADDR = 0x600
BANNER = b"KVMSHELL-GUEST\n"
HEARTBEAT = b"."
BEAT = b","
"""The page heartbeat: one per ``beat_pages`` pages dirtied (off unless asked for)."""
FILLS = ("sparse", "compressible", "incompressible")
"""What a pass writes in each page beyond its first 8 bytes (which the memory check reads)."""
_XORSHIFT_SEED = 0x2545F491

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
TICK_HZ = 1000
"""Nominal timer tick rate of a paced guest (PIT channel 0, ``PIT_HZ / PIT_DIVISOR``)."""
PIT_HZ = 1193182
PIT_DIVISOR = 1193
"""PIT input clock and the channel-0 divisor giving TICK_HZ (really 1000.15 Hz)."""
MAX_PACE = 2**32 - 1
IDT_ADDR = 0x1000
"""Where the guest builds its IDT at run time (free low RAM: above the pass counter at 0x600 and
the BIOS data area, below the boot sector and the stack growing down from 0x7C00)."""
IDT_ENTRIES = 256

_COM1 = 0x3F8
_PIC1_CMD = 0x20
_PIC1_DATA = 0x21
_PIC2_DATA = 0xA1
_PIT_CH0 = 0x40
_PIT_CMD = 0x43
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


def _assemble(ws_pages: int, pace: int, labels: dict[str, int], fill: str = "sparse",
              beat_pages: int = 0) -> tuple[bytes, dict[str, int]]:
    """One assembly pass. ``labels`` holds the addresses found by the previous pass (empty on the
    first pass: unknown labels then read as the current address); instruction sizes never depend
    on label values, so two passes are enough."""
    found: dict[str, int] = {}
    ws_end = WS_BASE + ws_pages * PAGE_SIZE
    a = _Code(LOAD_ADDR)

    def lab(name: str) -> int:
        return labels.get(name, a.here())

    # ---- 16-bit real mode, CS:IP = 0000:7C00 (or 07C0:0000 on odd BIOSes) -------------------
    a.emit(0xFA)                                          # cli
    a.emit(0xEA, _u16(lab("start16")), _u16(0))           # jmp 0x0000:start16  (CS = 0)
    found["start16"] = a.here()
    a.emit(0x31, 0xC0)                                    # xor ax, ax
    a.emit(0x8E, 0xD8)                                    # mov ds, ax
    a.emit(0x8E, 0xD0)                                    # mov ss, ax
    a.emit(0xBC, _u16(LOAD_ADDR))                         # mov sp, 0x7c00
    a.emit(0xE4, 0x92)                                    # in al, 0x92
    a.emit(0x0C, 0x02)                                    # or al, 0x02      (A20 on)
    a.emit(0x24, 0xFE)                                    # and al, 0xfe     (never the reset bit)
    a.emit(0xE6, 0x92)                                    # out 0x92, al
    a.emit(0x0F, 0x01, 0x16, _u16(lab("gdt_desc")))       # lgdt [gdt_desc]
    a.emit(0x0F, 0x20, 0xC0)                              # mov eax, cr0
    a.emit(0x66, 0x83, 0xC8, 0x01)                        # or eax, 1        (CR0.PE)
    a.emit(0x0F, 0x22, 0xC0)                              # mov cr0, eax
    a.emit(0x66, 0xEA, _u32(lab("pm32")), _u16(_CODE_SEL))  # jmp dword 0x08:pm32

    # ---- 32-bit protected mode ---------------------------------------------------------------
    found["pm32"] = a.here()
    a.emit(0x66, 0xB8, _u16(_DATA_SEL))                   # mov ax, 0x10
    a.emit(0x8E, 0xD8)                                    # mov ds, ax
    a.emit(0x8E, 0xC0)                                    # mov es, ax
    a.emit(0x8E, 0xD0)                                    # mov ss, ax
    a.emit(0xBC, _u32(LOAD_ADDR))                         # mov esp, 0x7c00
    a.emit(0xFC)                                          # cld
    a.emit(0xC7, 0x05, _u32(PASS_COUNTER_ADDR), _u32(0))  # mov dword [0x600], 0

    if ws_pages:
        # initialise every page: counter 0, MARKER, own address (RAM may hold firmware leftovers)
        a.emit(0xBB, _u32(WS_BASE))                       # mov ebx, WS_BASE
        found["init_loop"] = a.here()
        a.emit(0xC7, 0x03, _u32(MARKER << 8))             # mov dword [ebx], MARKER << 8
        a.emit(0x89, 0x5B, 0x04)                          # mov [ebx+4], ebx
        a.emit(0x81, 0xC3, _u32(PAGE_SIZE))               # add ebx, 0x1000
        a.emit(0x81, 0xFB, _u32(ws_end))                  # cmp ebx, WS_BASE + ws_pages*0x1000
        a.emit(0x72, a.rel8(found["init_loop"]))          # jb init_loop

    # IDT: IDT_ENTRIES 32-bit interrupt gates (selector 0x08, type 0x8E: present, ring 0),
    # every one pointing at irq_handler (its address is below 64 KiB: offset bits 31..16 = 0)
    a.emit(0xBF, _u32(IDT_ADDR))                          # mov edi, IDT_ADDR
    a.emit(0xB8, _u32(_CODE_SEL << 16 | lab("irq_handler")))  # mov eax, 0x08 << 16 | irq_handler
    a.emit(0xBA, _u32(0x8E00))                            # mov edx, 0x8e00
    found["idt_loop"] = a.here()
    a.emit(0x89, 0x07)                                    # mov [edi], eax
    a.emit(0x89, 0x57, 0x04)                              # mov [edi+4], edx
    a.emit(0x83, 0xC7, 0x08)                              # add edi, 8
    a.emit(0x81, 0xFF, _u32(IDT_ADDR + IDT_ENTRIES * 8))  # cmp edi, IDT_ADDR + IDT_ENTRIES*8
    a.emit(0x72, a.rel8(found["idt_loop"]))               # jb idt_loop
    a.emit(0x0F, 0x01, 0x1D, _u32(lab("idt_desc")))       # lidt [idt_desc]

    paced = bool(ws_pages and pace)
    if paced:
        # only IRQ0 (the PIT; SeaBIOS leaves it on vector 8) may interrupt; PIT channel 0 at
        # TICK_HZ. Interrupts stay disabled except in the pacing hlt.
        a.emit(0xB0, 0xFE)                                # mov al, 0xfe
        a.emit(0xE6, _PIC1_DATA)                          # out 0x21, al     (master: IRQ0 only)
        a.emit(0xB0, 0xFF)                                # mov al, 0xff
        a.emit(0xE6, _PIC2_DATA)                          # out 0xa1, al     (slave: all masked)
        a.emit(0xB0, 0x34)                                # mov al, 0x34     (ch 0, lo/hi, mode 2, binary)
        a.emit(0xE6, _PIT_CMD)                            # out 0x43, al
        a.emit(0xB0, _u8(PIT_DIVISOR))                    # mov al, PIT_DIVISOR & 0xff
        a.emit(0xE6, _PIT_CH0)                            # out 0x40, al
        a.emit(0xB0, _u8(PIT_DIVISOR >> 8))               # mov al, PIT_DIVISOR >> 8
        a.emit(0xE6, _PIT_CH0)                            # out 0x40, al

    # banner: ecx bytes from esi to COM1
    a.emit(0xBE, _u32(lab("banner")))                     # mov esi, banner
    a.emit(0xB9, _u32(len(BANNER)))                       # mov ecx, len(BANNER)
    a.emit(0x66, 0xBA, _u16(_COM1))                       # mov dx, 0x3f8
    found["banner_loop"] = a.here()
    a.emit(0xAC)                                          # lodsb
    a.emit(0xEE)                                          # out dx, al
    a.emit(0xE2, a.rel8(found["banner_loop"]))            # loop banner_loop

    if not ws_pages:
        # idle guest: interrupts stay disabled, so only an NMI ends the hlt
        found["idle"] = a.here()
        a.emit(0xF4)                                      # hlt
        a.emit(0xEB, a.rel8(found["idle"]))               # jmp idle
    else:
        if paced:
            a.emit(0xB9, _u32(pace))                      # mov ecx, pace    (pages until the next hlt)
        if fill == "incompressible":
            a.emit(0xBE, _u32(_XORSHIFT_SEED))            # mov esi, seed    (xorshift32 state)
        # one pass over the working set; ebx = page address
        found["pass_loop"] = a.here()
        a.emit(0xBB, _u32(WS_BASE))                       # mov ebx, WS_BASE
        found["page_loop"] = a.here()
        a.emit(0xC6, 0x43, 0x01, _u8(MARKER))             # mov byte [ebx+1], MARKER
        a.emit(0x89, 0x5B, 0x04)                          # mov [ebx+4], ebx
        if fill == "compressible":
            a.emit(0x51)                                  # push ecx
            a.emit(0xA1, _u32(PASS_COUNTER_ADDR))         # mov eax, [0x600]
            a.emit(0x31, 0xD8)                            # xor eax, ebx
            a.emit(0x8D, 0x7B, 0x08)                      # lea edi, [ebx+8]
            a.emit(0xB9, _u32(PAGE_SIZE // 4 - 2))        # mov ecx, 1022
            a.emit(0xF3, 0xAB)                            # rep stosd
            a.emit(0x59)                                  # pop ecx
        elif fill == "incompressible":
            a.emit(0x8D, 0x7B, 0x08)                      # lea edi, [ebx+8]
            a.emit(0xBD, _u32(PAGE_SIZE // 4 - 2))        # mov ebp, 1022
            found["xorshift"] = a.here()
            a.emit(0x89, 0xF0)                            # mov eax, esi
            a.emit(0xC1, 0xE0, 13)                        # shl eax, 13
            a.emit(0x31, 0xC6)                            # xor esi, eax
            a.emit(0x89, 0xF0)                            # mov eax, esi
            a.emit(0xC1, 0xE8, 17)                        # shr eax, 17
            a.emit(0x31, 0xC6)                            # xor esi, eax
            a.emit(0x89, 0xF0)                            # mov eax, esi
            a.emit(0xC1, 0xE0, 5)                         # shl eax, 5
            a.emit(0x31, 0xC6)                            # xor esi, eax
            a.emit(0x89, 0x37)                            # mov [edi], esi
            a.emit(0x83, 0xC7, 0x04)                      # add edi, 4
            a.emit(0x4D)                                  # dec ebp
            a.emit(0x75, a.rel8(found["xorshift"]))       # jnz xorshift
        a.emit(0xFE, 0x03)                                # inc byte [ebx]
        if beat_pages:
            # dx is 0x3f8 from the banner on (nothing else writes it)
            a.emit(0xF7, 0xC3, _u32(beat_pages * PAGE_SIZE - 1))  # test ebx, beat_pages*0x1000 - 1
            a.emit(0x75, 0x03)                            # jnz +3           (not a beat page)
            a.emit(0xB0, BEAT[0])                         # mov al, ','
            a.emit(0xEE)                                  # out dx, al
        if paced:
            # every pace pages, sleep until the next timer tick. Interrupts are enabled only
            # here (sti holds them off for one instruction, so a tick cannot slip in between
            # sti and hlt): a tick that fell while dirtying is still pending at the PIC and ends
            # this hlt at once, so a pass slower than the tick is not slowed down further.
            a.emit(0x49)                                  # dec ecx
            a.emit(0x75, a.rel8(lab("next_page")))        # jnz next_page
            a.emit(0xB9, _u32(pace))                      # mov ecx, pace
            a.emit(0xFB)                                  # sti
            a.emit(0xF4)                                  # hlt
            a.emit(0xFA)                                  # cli
            found["next_page"] = a.here()
        a.emit(0x81, 0xC3, _u32(PAGE_SIZE))               # add ebx, 0x1000
        a.emit(0x81, 0xFB, _u32(ws_end))                  # cmp ebx, WS_BASE + ws_pages*0x1000
        a.emit(0x72, a.rel8(found["page_loop"]))          # jb page_loop
        a.emit(0xFF, 0x05, _u32(PASS_COUNTER_ADDR))       # inc dword [0x600]
        a.emit(0x66, 0xBA, _u16(_COM1))                   # mov dx, 0x3f8
        a.emit(0xB0, HEARTBEAT[0])                        # mov al, '.'
        a.emit(0xEE)                                      # out dx, al
        a.emit(0xEB, a.rel8(found["pass_loop"]))          # jmp pass_loop

    # interrupt handler for every vector: acknowledge the master PIC (non-specific EOI; harmless
    # for an NMI or a spurious IRQ7), keep every register. It returns without iret, which KVM's
    # instruction emulator only handles in real mode (the kvm_pvm flavour emulates this guest's
    # interrupt returns and stops with "emulation failure" on a protected-mode iret): the frame
    # [eip, cs, eflags] becomes [eflags, eip, -] (cs is always 0x08), then popfd and ret 4.
    found["irq_handler"] = a.here()
    a.emit(0x50)                                          # push eax
    a.emit(0xB0, 0x20)                                    # mov al, 0x20
    a.emit(0xE6, _PIC1_CMD)                               # out 0x20, al     (EOI)
    a.emit(0x8B, 0x44, 0x24, 0x0C)                        # mov eax, [esp+12]  (eflags)
    a.emit(0x87, 0x44, 0x24, 0x04)                        # xchg eax, [esp+4]  (eip <-> eflags)
    a.emit(0x89, 0x44, 0x24, 0x08)                        # mov [esp+8], eax   (eip over cs)
    a.emit(0x58)                                          # pop eax
    a.emit(0x9D)                                          # popfd
    a.emit(0xC2, _u16(4))                                 # ret 4            (eip; drop the old eflags)

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
    found["idt_desc"] = a.here()
    a.emit(_u16(IDT_ENTRIES * 8 - 1), _u32(IDT_ADDR))     # dw idt_limit; dd IDT_ADDR
    return bytes(a.buf), found


def _check_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    return value


def _check_ws_pages(ws_pages: int) -> None:
    _check_int("ws_pages", ws_pages)
    if not 0 <= ws_pages <= MAX_WS_PAGES:
        raise ValueError(f"ws_pages must be in 0..{MAX_WS_PAGES}, got {ws_pages}")


def build_boot_sector(ws_pages: int, pace: int = 0, fill: str = "sparse", beat_pages: int = 0) -> bytes:
    """The 512-byte boot sector dirtying ``ws_pages`` pages from ``WS_BASE``.

    ``pace`` is the pages dirtied per timer tick (1/``TICK_HZ`` s): the guest halts after every
    ``pace`` pages until the next tick. 0: unpaced (no timer, interrupts stay disabled).
    ``ws_pages`` = 0 is an idle guest: the banner, then ``hlt`` forever (``pace`` is ignored).
    ``fill`` (one of ``FILLS``) is what each pass writes in a page's body; ``beat_pages`` (0 or a
    power of two) sends a ``BEAT`` on COM1 every that many pages.
    """
    _check_ws_pages(ws_pages)
    _check_int("pace", pace)
    if not 0 <= pace <= MAX_PACE:
        raise ValueError(f"pace must be in 0..{MAX_PACE}, got {pace}")
    if fill not in FILLS:
        raise ValueError(f"fill must be one of {', '.join(FILLS)}, got {fill!r}")
    _check_int("beat_pages", beat_pages)
    if beat_pages < 0 or beat_pages & (beat_pages - 1) or beat_pages * PAGE_SIZE > WS_LIMIT:
        raise ValueError(f"beat_pages must be 0 or a power of two up to {WS_LIMIT // PAGE_SIZE}, got {beat_pages}")
    _, labels = _assemble(ws_pages, pace, {}, fill, beat_pages)
    code, final = _assemble(ws_pages, pace, labels, fill, beat_pages)
    assert final == labels, "label addresses moved between passes"
    if len(code) > SECTOR_SIZE - 2:
        raise AssertionError(f"boot sector code too large: {len(code)} bytes")
    return code + bytes(SECTOR_SIZE - 2 - len(code)) + b"\x55\xAA"


def write_disk_image(path: str | os.PathLike[str], ws_pages: int, pace: int = 0, fill: str = "sparse",
                     beat_pages: int = 0) -> None:
    """Write a raw disk image: the boot sector, then zeros up to 1 MiB."""
    sector = build_boot_sector(ws_pages, pace, fill, beat_pages)
    with open(path, "wb") as f:
        f.write(sector)
        f.write(bytes(DISK_IMAGE_SIZE - len(sector)))


def min_ram_mib(ws_pages: int) -> int:
    """Smallest guest RAM (MiB) holding ``WS_BASE`` + the working set, rounded up, plus headroom."""
    _check_ws_pages(ws_pages)
    end = WS_BASE + ws_pages * PAGE_SIZE
    return -(-end // (1 << 20)) + RAM_HEADROOM_MIB


def rate_for_pace(pace: int) -> float:
    """Nominal dirty rate (bytes/s) of a guest built with ``pace``: ``pace`` pages per tick, or
    infinity for 0 (unpaced). Nominal: the real rate is lower when ``pace`` pages take longer
    than a tick to dirty (the ``hlt`` then waits for the tick after) or when ticks are late."""
    _check_int("pace", pace)
    if not 0 <= pace <= MAX_PACE:
        raise ValueError(f"pace must be in 0..{MAX_PACE}, got {pace}")
    if pace == 0:
        return math.inf
    return float(pace * PAGE_SIZE * TICK_HZ)


def pace_for_rate(bytes_per_second: float) -> int:
    """Pages per tick for a target dirty rate (bytes/s), rounded to the nearest and at least 1;
    0 (unpaced) for an infinite rate. The step is ``PAGE_SIZE * TICK_HZ`` (about 4 MB/s), so
    slow targets round up to 1 page per tick; clamped to ``MAX_PACE``."""
    if math.isnan(bytes_per_second) or bytes_per_second <= 0:
        raise ValueError(f"bytes_per_second must be > 0, got {bytes_per_second}")
    if math.isinf(bytes_per_second):
        return 0
    pages = math.floor(bytes_per_second / (PAGE_SIZE * TICK_HZ) + 0.5)
    return max(1, min(MAX_PACE, pages))
