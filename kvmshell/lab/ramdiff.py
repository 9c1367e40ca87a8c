"""Compare two dumps of a guest's RAM page by page: the source's (stopped after the migration) and the
destination's (paused with ``-S`` before it ran). They must be equal byte for byte; a page that
differs is one the migration did not move in its last state.

Pages of the Linux guest's working set (``workload.c``: a header ``MAGIC, i | gen << 32, seed``) are
named with the generation each side holds, which tells a stale page (the destination one behind) from
a damaged one; any other page (the kernel's, the workload's generation table) is counted as "other".
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path

PAGE = 4096
CHUNK = 1 << 20
WS_MAGIC = 0x3147575348535658
"""workload.c's MAGIC: the first word of every page of the working set."""
MAX_NAMED = 10


@dataclass
class RamDiff:
    """What differs between two RAM dumps of the same size."""
    pages: int = 0
    differing: int = 0
    ws_pages: int = 0
    """Differing pages that hold a working-set header on either side."""
    stale: int = 0
    """Working-set pages whose destination generation is behind the source's."""
    named: list[str] = field(default_factory=list)
    """The first MAX_NAMED differing pages, each with its physical address and what it holds."""

    @property
    def equal(self) -> bool:
        return self.differing == 0

    def summary(self) -> str:
        if self.equal:
            return f"equal: {self.pages} pages"
        return (f"{self.differing} of {self.pages} pages differ ({self.ws_pages} of the working set, "
                f"{self.stale} of them stale on the destination; {self.differing - self.ws_pages} other); "
                f"first: {'; '.join(self.named[:3])}")


def _ws_header(page: bytes) -> tuple[int, int] | None:
    """(index, generation) of a working-set page, None for any other page."""
    magic, word = struct.unpack_from("<QQ", page)
    return (word & 0xFFFFFFFF, word >> 32) if magic == WS_MAGIC else None


def _page(diff: RamDiff, phys: int, src: bytes, dst: bytes) -> None:
    diff.differing += 1
    s, d = _ws_header(src), _ws_header(dst)
    if s or d:
        diff.ws_pages += 1
        if s and d and s[0] == d[0] and d[1] < s[1]:
            diff.stale += 1
    if len(diff.named) < MAX_NAMED:
        what = (f"ws page {s[0] if s else '?'}: source gen {s[1] if s else '-'}, "
                f"destination gen {d[1] if d else '-'}") if s or d else "other"
        diff.named.append(f"0x{phys:x} {what}")


def diff_dumps(src: Path, dst: Path) -> RamDiff:
    """Compare ``src`` and ``dst`` (the same size, a multiple of a page) page by page."""
    size = src.stat().st_size
    if dst.stat().st_size != size or size % PAGE:
        raise ValueError(f"dumps of {size} and {dst.stat().st_size} bytes: not the same whole pages")
    diff = RamDiff(pages=size // PAGE)
    with src.open("rb") as fs, dst.open("rb") as fd:
        offset = 0
        while a := fs.read(CHUNK):
            b = fd.read(len(a))
            if a != b:
                for at in range(0, len(a), PAGE):
                    if a[at:at + PAGE] != b[at:at + PAGE]:
                        _page(diff, offset + at, a[at:at + PAGE], b[at:at + PAGE])
            offset += len(a)
    return diff
