"""The "nothing lost" check of a working-set dump written by the :mod:`kvmshell.lab.image` guest.

A dump (guest physical memory ``WS_BASE .. WS_BASE + n*4096``, read with the guest paused) is
valid iff

* every page has ``MARKER`` at offset 1 and its own physical address (dword LE) at offset 4;
* the counters (byte 0 of each page) read ``[v+1]*k + [v]*(n-k)`` (mod 256) for some v and
  0 <= k <= n: the guest increments the pages in address order, so at any instant the pages
  already done in the current pass are one ahead of the others.

A page lost in migration (sent as zero, stale by a pass, or landed at the wrong address) breaks
one of those. When all counters are equal the dump is valid with k = 0.

The valid case costs a few strided slices (``data[0::4096]``) and C-level comparisons; the
per-page Python work only happens when something is wrong, to name the bad pages.
"""

from __future__ import annotations

import sys
from array import array
from collections import Counter
from dataclasses import dataclass

from kvmshell.lab.image import MARKER, PAGE_SIZE, WS_BASE

MAX_PROBLEMS = 10


@dataclass(frozen=True)
class MemCheck:
    ok: bool
    pages: int
    value: int | None
    """v: the counter of the trailing pages (best fit when not ok); None when not determinable."""
    boundary: int | None
    """k: the number of leading pages at v+1 (best fit when not ok); None when not determinable."""
    problems: tuple[str, ...]
    """The first ``MAX_PROBLEMS`` bad pages, each naming the page index and address."""
    bad_pages: int = 0
    """How many pages are bad in total (``problems`` stops at ``MAX_PROBLEMS``)."""

    def summary(self) -> str:
        if self.ok:
            return (f"ok: {self.pages} pages, counter {self.value}, "
                    f"{self.boundary} page(s) ahead at {(self.value + 1) % 256}")  # type: ignore[operator]
        if self.pages == 0:
            return "FAILED: empty working set"
        first = self.problems[0] if self.problems else "?"
        return f"FAILED: {self.bad_pages} of {self.pages} pages bad; first: {first}"


def _expected_addresses(base: int, n: int) -> bytes:
    """The dwords base, base+4096, ... as little-endian bytes."""
    if array("I").itemsize == 4:
        arr = array("I", range(base, base + n * PAGE_SIZE, PAGE_SIZE))
        if sys.byteorder == "big":
            arr.byteswap()
        return arr.tobytes()
    return b"".join((base + i * PAGE_SIZE).to_bytes(4, "little") for i in range(n))


def _actual_addresses(data: bytes, n: int) -> bytes:
    """The dword at offset 4 of each page, concatenated."""
    out = bytearray(4 * n)
    for j in range(4):
        out[j::4] = data[4 + j::PAGE_SIZE]
    return bytes(out)


def _counters_fit(counters: bytes) -> tuple[int, int] | None:
    """(v, k) when ``counters`` is exactly [v+1]*k + [v]*(n-k) mod 256, else None."""
    n = len(counters)
    first, last = counters[0], counters[-1]
    if counters.count(first) == n:
        return first, 0
    if first != (last + 1) % 256:
        return None
    k = counters.index(last)
    if counters.count(first, 0, k) == k and counters.count(last, k) == n - k:
        return last, k
    return None


def _best_fit(counters: bytes) -> tuple[int, int]:
    """(v, k) minimising the pages that disagree with [v+1]*k + [v]*(n-k).

    Candidates for v are the two most common values and the values one below them; for each,
    the best k comes from one pass over the counters (prefix sums of mismatches).
    """
    n = len(counters)
    common = [value for value, _ in Counter(counters).most_common(2)]
    candidates = dict.fromkeys(c % 256 for value in common for c in (value, value - 1))
    best: tuple[int, int, int] | None = None  # (mismatches, v, k)
    for v in candidates:
        ahead = (v + 1) % 256
        # k = 0: every page should be v
        mismatches = n - counters.count(v)
        best_k, best_m = 0, mismatches
        for i, c in enumerate(counters):
            # moving page i from the "v" side to the "v+1" side
            mismatches += (c != ahead) - (c != v)
            if mismatches < best_m:
                best_k, best_m = i + 1, mismatches
        if best is None or best_m < best[0]:
            best = (best_m, v, best_k)
    assert best is not None
    return best[1], best[2]


def check_working_set(data: bytes, base: int = WS_BASE) -> MemCheck:
    """Check a dump of the working set starting at guest physical address ``base``."""
    if len(data) % PAGE_SIZE:
        raise ValueError(f"dump length {len(data)} is not a multiple of {PAGE_SIZE}")
    n = len(data) // PAGE_SIZE
    if base < 0 or base + len(data) > 2**32:
        raise ValueError(f"dump 0x{base:x}+0x{len(data):x} does not fit in 32-bit addresses")
    if n == 0:
        return MemCheck(False, 0, None, None, ("empty working set",), 0)
    data = bytes(data) if not isinstance(data, bytes) else data

    counters = data[0::PAGE_SIZE]
    markers = data[1::PAGE_SIZE]
    addresses = _actual_addresses(data, n)
    expected = _expected_addresses(base, n)

    fit = _counters_fit(counters)
    markers_ok = markers.count(MARKER) == n
    addresses_ok = addresses == expected
    if fit is not None and markers_ok and addresses_ok:
        return MemCheck(True, n, fit[0], fit[1], ())

    v, k = fit if fit is not None else _best_fit(counters)
    problems: list[str] = []
    bad = 0
    for i in range(n):
        issues = []
        if markers[i] != MARKER:
            issues.append(f"marker 0x{markers[i]:02x}, expected 0x{MARKER:02x}")
        got_addr = addresses[4 * i:4 * i + 4]
        if got_addr != expected[4 * i:4 * i + 4]:
            issues.append(f"address 0x{int.from_bytes(got_addr, 'little'):08x}, "
                          f"expected 0x{base + i * PAGE_SIZE:08x}")
        c = counters[i]
        want = (v + 1) % 256 if i < k else v
        if c != want:
            if c in (v, (v + 1) % 256):
                issues.append(f"counter {c}, expected {want} (out of order; boundary at page {k})")
            else:
                issues.append(f"counter {c}, expected {v} or {(v + 1) % 256}")
        if issues:
            bad += 1
            if len(problems) < MAX_PROBLEMS:
                problems.append(f"page {i} (0x{base + i * PAGE_SIZE:x}): " + "; ".join(issues))
    return MemCheck(False, n, v, k, tuple(problems), bad)
