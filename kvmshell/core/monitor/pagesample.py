"""Reading random guest RAM pages through the monitor's ``xp`` (both protocols have it, through
HMP): where the RAM is (``info mtree -f``, or the usual x86 layout when that cannot be read), and
what a page dump says (all zero or not, how well it compresses).
"""

from __future__ import annotations

import random
import re
import zlib
from collections import defaultdict
from collections.abc import Sequence

PAGE = 4096
WORDS = PAGE // 8
KIB, MIB, GIB = 1 << 10, 1 << 20, 1 << 30

Range = tuple[int, int]          # [start, end) guest-physical bytes

_FLAT_RE = re.compile(r"^\s*([0-9a-fA-F]+)-([0-9a-fA-F]+) \(prio -?\d+, ([a-z/]+)\): (\S+)")
_WORD_RE = re.compile(r"0x([0-9a-fA-F]+)")


def ram_ranges(mtree: str, ram_size: int) -> list[Range]:
    """The guest RAM's ranges in the system memory's flat view (``info mtree -f``): the biggest
    RAM regions by name until they hold (about) ``ram_size``, so video RAM and ROMs stay out."""
    by_name: dict[str, list[Range]] = defaultdict(list)
    in_memory = False
    for line in mtree.splitlines():
        if line.startswith("FlatView"):
            if by_name:
                break                    # the system memory's view is done
            in_memory = False
        elif line.strip() == "Root memory region: memory":
            in_memory = True
        elif in_memory:
            m = _FLAT_RE.match(line)
            if m and m.group(3) == "ram":
                by_name[m.group(4)].append((int(m.group(1), 16), int(m.group(2), 16) + 1))
    ranges: list[Range] = []
    held = 0
    for _name, rs in sorted(by_name.items(), key=lambda kv: -sum(e - s for s, e in kv[1])):
        if held >= ram_size * 0.9:
            break
        ranges += rs
        held += sum(e - s for s, e in rs)
    return sorted(ranges)


def usual_ranges(ram_size: int) -> list[Range]:
    """Where an x86 pc or q35 guest's RAM surely is, without its device holes: below 640 KiB, 1 MiB
    up to 2 GiB (both machines' low RAM reaches that far), and above 4 GiB what both put there."""
    ranges = [(0, min(ram_size, 640 * KIB))]
    if ram_size > MIB:
        ranges.append((MIB, min(ram_size, 2 * GIB)))
    high = ram_size - (3 * GIB + GIB // 2)
    if high > 0:
        ranges.append((4 * GIB, 4 * GIB + high))
    return ranges


def pick_pages(ranges: Sequence[Range], count: int, rng: random.Random) -> list[int]:
    """``count`` distinct page addresses drawn uniformly from ``ranges`` (fewer when they are small)."""
    spans = [(s // PAGE, e // PAGE) for s, e in ranges if e // PAGE > s // PAGE]
    total = sum(e - s for s, e in spans)
    picks = rng.sample(range(total), min(count, total))
    addresses = []
    for i in sorted(picks):
        for s, e in spans:
            if i < e - s:
                addresses.append((s + i) * PAGE)
                break
            i -= e - s
    return addresses


def page_bytes(dump: str) -> bytes:
    """The bytes of an ``xp /512gx`` dump (64-bit words, little-endian as x86 holds them)."""
    words = []
    for line in dump.splitlines():
        _addr, sep, rest = line.partition(":")
        if sep:
            words += [int(w, 16) for w in _WORD_RE.findall(rest)]
    if len(words) != WORDS:
        raise ValueError(f"expected {WORDS} words in an xp dump, got {len(words)}")
    return b"".join(w.to_bytes(8, "little") for w in words)


def compressed_size(data: bytes) -> int:
    return len(zlib.compress(data, 1))
