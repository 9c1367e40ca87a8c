"""Bytes on the wire: what each way QEMU has of sending fewer bytes would cost this guest. Pure: the
figures measured before the start in (``WireData``, ``Headroom``: ``WireInputs``), one ``WireCost`` per
option out (auto picks among them: model/choice.py).

The options (QEMU 7.2 names; the guest's QEMU must have each, discovered from the guest):

* plain pre-copy: every non-zero page as it is, one stream;
* ``multifd``: the pages over several streams (``multifd-channels``), where one TCP stream is the limit;
* ``compress``: multifd with ``multifd-compression`` zstd (or zlib): each page costs its compressed size
  on the wire, and the compressing cores (source) and decompressing ones (destination) become a limit;
* ``xbzrle``: a re-dirtied page found in the source's cache is sent as its delta to the cached copy.
  The first pass is plain; the cache costs the source ``xbzrle-cache-size`` bytes of memory.

Each is run through the pre-copy model (``predict``) with the rate it moves page bytes at. Multifd's
``ram.transferred`` counts page bytes before compression (measured here), so QEMU's threshold
(bandwidth x downtime limit) grows with compression too. XBZRLE's does not: QEMU measures its bandwidth
in the encoded bytes it writes while the dirty set stays in page bytes, so its passes run faster but the
final set must still fit the wire rate x the limit (``_xbzrle``).

Figures fitted on this machine (QEMU 7.2, 2 cores): one migration TCP stream moves ~2.2 GB/s on
loopback; XBZRLE encodes in the migration thread; decompression is about 4x faster than compression.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import groupby
from dataclasses import dataclass, field, replace

from kvmshell.core.migration.model.predict import (
    FIXED_DOWNTIME_S, ZERO_SCAN_RATE, Inputs, Prediction, Verdict, dirtied, predict,
)
from kvmshell.core.values.models import ParamValue

PAGE = 4096
STREAM_RATE = 2.2e9            # bytes/s one migration stream moves when the link is not the limit
XBZRLE_RATE = 1.0e9            # page bytes/s the migration thread xor-encodes against the cache
XBZRLE_PAGE_OVERHEAD = 16      # bytes per encoded page: header, run lengths (no encoded pages measured)
XBZRLE_HEADER = 12             # bytes per encoded page besides its runs: page header, encoding flag, length
DECOMPRESS_FACTOR = 4.0        # decompressing is this many times faster than compressing
MIN_CORES = 0.5                # a busy host still gives a compressing thread this share of a core
CHANNELS = 2                   # multifd channels: QEMU's default; more only with idle cores for them
SAME_S = 0.05                  # options within this share of each other's time: the cheaper CPU wins


@dataclass(frozen=True)
class WireData:
    """The guest's pages, sampled before the start: how well the non-zero ones compress and how much of a
    re-dirtied page changes. Compression speeds are measured on kvmshell's host, standing in for QEMU's."""

    pages: int                          # pages read
    zero_fraction: float                # of them, all zero
    zstd_ratio: float                   # compressed / raw size of the non-zero pages (zstd level 1)
    zlib_ratio: float                   # ... zlib level 1
    zstd_speed: float                   # page bytes/s one core compresses (zstd level 1)
    zlib_speed: float
    changed: int = 0                    # pages read twice that changed in between
    delta_fraction: float | None = None  # of a changed page, the share of its bytes that changed
    xbzrle_share: float | None = None    # of a changed page, the share XBZRLE puts on the wire (``xbzrle_size``)
    interval_s: float = 0.0             # between the two reads of a page
    changed_zstd_ratio: float | None = None  # the changed pages' second read: what the re-sends compress to
    changed_zlib_ratio: float | None = None

    @property
    def changed_fraction(self) -> float:
        return self.changed / self.pages if self.pages else 0.0

    def text(self) -> str:
        delta = (f"{self.changed} of {self.pages} pages changed within {self.interval_s:.1f} s, "
                 f"{PAGE * self.delta_fraction:.0f} of their {PAGE} bytes" if self.delta_fraction is not None
                 else f"no page of {self.pages} changed within {self.interval_s:.1f} s")
        if self.xbzrle_share is not None:
            delta += f" (XBZRLE would send {100 * self.xbzrle_share:.0f} % of them)"
        if self.changed_zstd_ratio is not None:
            delta += f"; the changed pages compress to {100 * self.changed_zstd_ratio:.0f} % (zstd)"
        return (f"non-zero pages compress to {100 * self.zstd_ratio:.0f} % (zstd, {self.zstd_speed / 1e6:.0f} MB/s "
                f"a core) or {100 * self.zlib_ratio:.0f} % (zlib, {self.zlib_speed / 1e6:.0f} MB/s); {delta}")


@dataclass(frozen=True)
class Headroom:
    """Idle cores on each host over a short window (/proc/stat), of how many."""

    source_idle: float
    source_cores: int
    dest_idle: float
    dest_cores: int

    def text(self) -> str:
        return (f"idle cores: source {self.source_idle:.1f} of {self.source_cores}, destination "
                f"{self.dest_idle:.1f} of {self.dest_cores}")


@dataclass(frozen=True)
class WireOption:
    """One way to send the pages: the strategy that runs it and the settings it needs on both sides."""

    strategy: str                       # "precopy", "multifd", "compress", "xbzrle"
    capabilities: dict[str, bool] = field(default_factory=dict)
    parameters: dict[str, ParamValue] = field(default_factory=dict)

    def text(self) -> str:
        on = [k for k, v in self.capabilities.items() if v]
        return ", ".join([*on, *(f"{k} {v}" for k, v in self.parameters.items())]) or "plain pre-copy"


PLAIN = WireOption("precopy")


def multifd(channels: int = CHANNELS) -> WireOption:
    return WireOption("multifd", {"multifd": True, "xbzrle": False},
                      {"multifd-channels": channels, "multifd-compression": "none"})


def compress(method: str = "zstd", level: int = 1, channels: int = CHANNELS) -> WireOption:
    return WireOption("compress", {"multifd": True, "xbzrle": False},
                      {"multifd-channels": channels, "multifd-compression": method, f"multifd-{method}-level": level})


def xbzrle(cache_bytes: int) -> WireOption:
    return WireOption("xbzrle", {"xbzrle": True, "multifd": False}, {"xbzrle-cache-size": cache_bytes})


def cache_size(working_set: float | None, ram: float) -> int:
    """An XBZRLE cache that holds the working set with a quarter to spare: a power of two (QEMU rounds
    down to one), at least 64 MiB (QEMU's default), at most the RAM."""
    want = max(64 << 20, 1.25 * (working_set or 0.0))
    size = 1 << (int(want) - 1).bit_length()
    return int(min(size, max(64 << 20, 1 << (int(ram).bit_length() - 1))))


@dataclass(frozen=True)
class WireCost:
    """One option's predicted cost: time, downtime, bytes on the wire, CPU seconds on both hosts."""

    option: WireOption
    prediction: Prediction
    rate: float                         # page bytes/s it moves
    wire_bytes: float | None            # bytes on the wire until completion (None: it never completes)
    cpu_s: float | None                 # CPU seconds it costs both hosts together (beyond plain sending)
    limit: str                          # what bounds its rate

    @property
    def converges(self) -> bool:
        return self.prediction.verdict is Verdict.CONVERGES

    def line(self) -> str:
        p = self.prediction
        if not self.converges:
            return f"{self.option.strategy} ({self.option.text()}): {p.verdict.value} at {self.rate / 1e6:.0f} MB/s ({self.limit})"
        return (f"{self.option.strategy} ({self.option.text()}): {p.total_s or 0:.2f} s, downtime "
                f"{p.downtime_ms or 0:.0f} ms, {_mb(self.wire_bytes or 0)} on the wire, "
                f"{self.cpu_s or 0:.1f} CPU s, {self.rate / 1e6:.0f} MB/s ({self.limit})")


def _mb(x: float) -> str:
    return f"{x / 1e6:.1f} MB" if x < 10e6 else f"{x / 1e6:.0f} MB"


@dataclass(frozen=True)
class Guest:
    """What the model needs of the guest and the path, besides its pages."""

    ram: float                          # bytes
    dirty_rate: float                   # bytes/s (a lower bound is fine: with a working set it is capped)
    working_set: float | None
    link: float                         # bytes/s
    downtime_limit_s: float


def _inputs(g: Guest, data: WireData, rate: float, final: float) -> Inputs:
    zero = g.ram * data.zero_fraction
    return Inputs(ram_bytes=g.ram - zero, zero_bytes=zero, dirty_rate=g.dirty_rate, working_set=g.working_set,
                  rate=rate, link=final, downtime_limit_s=g.downtime_limit_s)


def _plain(opt: WireOption, g: Guest, data: WireData, streams: int) -> WireCost:
    rate = min(g.link, streams * STREAM_RATE)
    limit = "the link" if rate == g.link else f"{streams} stream(s)"
    p = predict(_inputs(g, data, rate, rate))
    return WireCost(opt, p, rate, p.bytes_total, 0.0 if p.bytes_total is not None else None, limit)


def _compressed(opt: WireOption, g: Guest, data: WireData, room: Headroom) -> WireCost:
    """The first pass at the non-zero pages' ratio; the re-sends at the changed pages' own ratio where the
    sample saw pages change (a guest's resident pages and the ones it rewrites compress alike only by
    chance), bounded by the link, the cores that compress and decompress, and the streams."""
    method = str(opt.parameters["multifd-compression"])
    channels = int(opt.parameters["multifd-channels"])
    ratio, speed = (data.zstd_ratio, data.zstd_speed) if method == "zstd" else (data.zlib_ratio, data.zlib_speed)
    changed = data.changed_zstd_ratio if method == "zstd" else data.changed_zlib_ratio
    ratio = max(ratio, 1e-3)
    again = max(changed, 1e-3) if changed is not None else ratio
    src = speed * min(channels, max(MIN_CORES, room.source_idle))
    dst = speed * DECOMPRESS_FACTOR * min(channels, max(MIN_CORES, room.dest_idle))

    def bound(r: float) -> tuple[float, str]:
        bounds = {"the link": g.link / r, "compressing on the source": src, "decompressing on the destination": dst,
                  f"{channels} stream(s)": channels * STREAM_RATE / r}
        limit = min(bounds, key=lambda k: bounds[k])
        return bounds[limit], limit

    (first_rate, _), (rate, limit) = bound(ratio), bound(again)
    zero = g.ram * data.zero_fraction
    first = g.ram - zero
    t1 = first / first_rate + zero / ZERO_SCAN_RATE
    p = predict(Inputs(ram_bytes=0.0, dirty_rate=g.dirty_rate, working_set=g.working_set, rate=rate, link=rate,
                       downtime_limit_s=g.downtime_limit_s, dirty_set=dirtied(g.dirty_rate, g.working_set, t1),
                       elapsed_s=t1, sent=first))
    if p.bytes_total is None:
        return WireCost(opt, p, rate, None, None, limit)
    cpu = p.bytes_total / speed + p.bytes_total / (speed * DECOMPRESS_FACTOR)
    return WireCost(opt, p, rate, first * ratio + (p.bytes_total - first) * again, cpu, limit)


def _xbzrle(opt: WireOption, g: Guest, data: WireData) -> WireCost:
    """The first pass plain; later passes at the delta's size for pages the cache holds, whole pages
    for the others. QEMU's threshold stays the wire rate x the limit: run the model in page bytes with
    the limit scaled by the encoded share, so that its threshold is the same bytes."""
    cache = float(opt.parameters["xbzrle-cache-size"])
    held = 1.0 if not g.working_set else min(1.0, cache / g.working_set)
    if data.xbzrle_share is not None:
        encoded = data.xbzrle_share
    else:
        delta = data.delta_fraction if data.delta_fraction is not None else 1.0
        encoded = min(1.0, delta + XBZRLE_PAGE_OVERHEAD / PAGE)
    share = held * encoded + (1 - held)
    wire = min(g.link, STREAM_RATE)
    later = min(wire / share, XBZRLE_RATE)
    limit = "the link" if later == wire / share else "xbzrle encoding (one thread)"
    zero = g.ram * data.zero_fraction
    first = g.ram - zero
    t1 = first / wire + zero / ZERO_SCAN_RATE
    after = dirtied(g.dirty_rate, g.working_set, t1)
    p = predict(Inputs(ram_bytes=0.0, dirty_rate=g.dirty_rate, working_set=g.working_set, rate=later, link=later,
                       downtime_limit_s=g.downtime_limit_s * wire / later, dirty_set=after, elapsed_s=t1, sent=first))
    if p.bytes_total is None:
        return WireCost(opt, p, later, None, None, limit)
    p = replace(p, downtime_ms=max(p.downtime_ms or 0.0, FIXED_DOWNTIME_S * 1000))
    later_bytes = p.bytes_total - first
    return WireCost(opt, p, later, first + later_bytes * share, later_bytes / XBZRLE_RATE, limit)


def cost(opt: WireOption, g: Guest, data: WireData, room: Headroom) -> WireCost:
    """One option's predicted cost on this guest and path."""
    if opt.capabilities.get("xbzrle"):
        return _xbzrle(opt, g, data)
    if opt.parameters.get("multifd-compression", "none") != "none":
        return _compressed(opt, g, data, room)
    return _plain(opt, g, data, int(opt.parameters.get("multifd-channels", 1)) if opt.capabilities.get("multifd") else 1)


def options(g: Guest, *, compressions: Sequence[str] = ("zstd", "zlib")) -> list[WireOption]:
    """The options worth costing: plain, multifd, multifd with each compression the guest's QEMU has,
    XBZRLE with a cache for the working set."""
    out = [PLAIN, multifd()]
    out += [compress(m) for m in ("zstd", "zlib") if m in compressions]
    out.append(xbzrle(cache_size(g.working_set, g.ram)))
    return out


@dataclass(frozen=True)
class WireInputs:
    """What the options are costed from, measured before the start: the guest's pages, both hosts' idle
    cores, and what the guest's QEMU has (its multifd compressions, its migration capabilities)."""

    data: WireData
    room: Headroom
    compressions: tuple[str, ...] = ("zstd", "zlib")
    capabilities: frozenset[str] = frozenset({"multifd", "xbzrle"})

    def costs(self, g: Guest, data: WireData | None = None) -> list[WireCost]:
        """Each option the guest's QEMU has, costed for ``g`` (``data``: the pages, if not those sampled)."""
        return [cost(o, g, data or self.data, self.room) for o in options(g, compressions=self.compressions)
                if all(k in self.capabilities for k, v in o.capabilities.items() if v)]

    def sampled_guest(self, ram: float, link: float, downtime_limit_s: float) -> Guest:
        """The guest as the page sample alone sees it (no pre-flight range): the pages that changed
        between the two reads are its working set, re-dirtied once per interval."""
        ws = self.data.changed_fraction * ram or None
        return Guest(ram=ram, dirty_rate=(ws or 0.0) / max(self.data.interval_s, 0.1), working_set=ws, link=link,
                     downtime_limit_s=downtime_limit_s)


def why(chosen: WireCost | None, costs: Sequence[WireCost], downtime_limit_s: float) -> str:
    """The choice in numbers: what it costs, and every option's cost."""
    each = "; ".join(c.line() for c in costs)
    if chosen is None:
        return f"no option converges within {downtime_limit_s * 1000:.0f} ms: {each}"
    return (f"{chosen.option.strategy} is the fastest within the {downtime_limit_s * 1000:.0f} ms downtime limit "
            f"(ties within {100 * SAME_S:.0f} %: fewer CPU seconds): {each}")


def idle_cores(before: str, after: str) -> float:
    """Idle cores between two ``cpu`` lines of /proc/stat (idle + iowait over all jiffies, x cores)."""
    a, b = ([int(x) for x in line.split()[1:]] for line in (before, after))
    d = [y - x for x, y in zip(a, b)]
    total = sum(d[:8])                   # user nice system idle iowait irq softirq steal
    return (d[3] + d[4]) / total if total > 0 else 0.0


def _uleb128(n: int) -> int:
    """Bytes of ``n`` as an unsigned LEB128 number."""
    return max(1, (n.bit_length() + 6) // 7)


def xbzrle_size(cached: bytes, page: bytes) -> int:
    """Bytes QEMU's XBZRLE puts on the wire for ``page`` against its ``cached`` copy: each run of changed
    bytes as the length of the unchanged run before it (maybe 0), its own length (ULEB128 both) and its
    bytes, plus ``XBZRLE_HEADER``; 0 when nothing changed; the whole page as is when the encoding would
    not fit in one (QEMU's overflow)."""
    size, unchanged = 0, 0
    for changed, run in groupby(a != b for a, b in zip(cached, page)):
        k = sum(1 for _ in run)
        if changed:
            size += _uleb128(unchanged) + _uleb128(k) + k
        unchanged = 0 if changed else k
    if size == 0:
        return 0
    return size + XBZRLE_HEADER if size < len(page) else len(page) + XBZRLE_HEADER


def delta_share(first: bytes, second: bytes) -> float:
    """The share of a page's bytes that differ between two reads of it."""
    return sum(1 for x, y in zip(first, second) if x != y) / max(1, len(first))
