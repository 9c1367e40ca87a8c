"""Compare two dumps of a guest's RAM page by page: the source's (stopped after the migration) and the
destination's (paused with ``-S`` before it ran). They must be equal byte for byte; a page that
differs is one the migration did not move in its last state.

Pages of the Linux guest's working set (``workload.c``: a header ``MAGIC, i | gen << 32, seed``) are
named with the generation each side holds, which tells a stale page (the destination one behind) from
a damaged one; pages the caller labels (by guest-physical address, e.g. the workload's generation
table from ``where gen K``) are counted by label; any other page (the kernel's) as "other".
"""

from __future__ import annotations

import struct
from collections import Counter
from collections.abc import Mapping
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
    labelled: Counter[str] = field(default_factory=Counter)
    """Differing pages (not of the working set) by the caller's label."""
    named: list[str] = field(default_factory=list)
    """The first MAX_NAMED differing pages, each with its physical address and what it holds."""

    @property
    def equal(self) -> bool:
        return self.differing == 0

    def summary(self) -> str:
        if self.equal:
            return f"equal: {self.pages} pages"
        labelled = "".join(f", {n} {label}" for label, n in sorted(self.labelled.items()))
        other = self.differing - self.ws_pages - sum(self.labelled.values())
        return (f"{self.differing} of {self.pages} pages differ ({self.ws_pages} of the working set, "
                f"{self.stale} of them stale on the destination{labelled}; {other} other); "
                f"first: {'; '.join(self.named[:3])}")


def _ws_header(page: bytes) -> tuple[int, int] | None:
    """(index, generation) of a working-set page, None for any other page."""
    magic, word = struct.unpack_from("<QQ", page)
    return (word & 0xFFFFFFFF, word >> 32) if magic == WS_MAGIC else None


def _page(diff: RamDiff, phys: int, src: bytes, dst: bytes, label: str | None) -> None:
    diff.differing += 1
    s, d = _ws_header(src), _ws_header(dst)
    if s or d:
        diff.ws_pages += 1
        if s and d and s[0] == d[0] and d[1] < s[1]:
            diff.stale += 1
        what = f"ws page {s[0] if s else '?'}: source gen {s[1] if s else '-'}, destination gen {d[1] if d else '-'}"
    elif label:
        diff.labelled[label] += 1
        what = label
    else:
        what = "other"
    if len(diff.named) < MAX_NAMED:
        diff.named.append(f"0x{phys:x} {what}")


def diff_dumps(src: Path, dst: Path, labels: Mapping[int, str] | None = None) -> RamDiff:
    """Compare ``src`` and ``dst`` (the same size, a multiple of a page) page by page; ``labels``
    names pages by their guest-physical address (a multiple of the page size)."""
    labels = labels or {}
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
                        phys = offset + at
                        _page(diff, phys, a[at:at + PAGE], b[at:at + PAGE], labels.get(phys))
            offset += len(a)
    return diff
