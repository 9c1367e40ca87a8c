"""Typed samples of a running migration, a ring buffer of them, and the JSON-lines trace format.

A sample is what ``query-migrate`` says at one instant, plus what kvmshell derives from the previous
sample (throughput, dirty bytes/s). The trace file is one JSON object per line: a header line
(``{"kind": "header", ...}``), then ``{"kind": "sample", ...}`` and ``{"kind": "event", ...}`` lines,
so `kvmshell report` and the model's tests can replay a real run.
"""

from __future__ import annotations

import json
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TextIO

from kvmshell.core.values.models import MigrationInfo, MigrationStatus

TRACE_VERSION = 1


@dataclass(frozen=True)
class Sample:
    t: float                       # seconds since the migration started (kvmshell's clock)
    status: MigrationStatus
    pass_no: int                   # ram.dirty-sync-count (1 during the first pass)
    transferred: int               # bytes sent so far (ram)
    remaining: int                 # bytes still to send, as QEMU sees it now
    total: int                     # guest RAM bytes
    dirty_pages_rate: int          # pages/s, QEMU's figure (0 during the first pass)
    dirty_bytes_rate: int          # bytes/s (pages x page size)
    mbps: float                    # QEMU's throughput figure (megabits/s)
    throughput: float              # bytes/s between this sample and the previous one (kvmshell's)
    expected_downtime_ms: int | None
    cpu_throttle: int              # cpu-throttle-percentage, 0 when off
    postcopy_requests: int
    downtime_ms: int | None = None        # after completion
    total_time_ms: int | None = None      # after completion
    normal_bytes: int = 0                 # non-zero pages sent (bytes)
    duplicate_pages: int = 0              # zero pages
    disk_remaining: int | None = None
    error: str | None = None              # QEMU's error-desc, when it failed

    def __post_init__(self) -> None:
        if not isinstance(self.status, MigrationStatus):          # read from a trace file
            object.__setattr__(self, "status", MigrationStatus(str(self.status)))

    @classmethod
    def from_info(cls, info: MigrationInfo, t: float, previous: Sample | None,
                  reference: Sample | None = None) -> Sample:
        """``previous`` fills what QEMU left out; throughput is measured since ``reference`` (an
        older sample, so that two samples a few ms apart do not make a spike), else ``previous``."""
        ram = info.ram
        transferred = ram.transferred if ram else (previous.transferred if previous else 0)
        throughput = 0.0
        ref = reference or previous
        if ref is not None and t > ref.t:
            throughput = max(0.0, (transferred - ref.transferred) / (t - ref.t))
        return cls(
            t=round(t, 4), status=info.status,
            pass_no=ram.dirty_sync_count if ram else (previous.pass_no if previous else 0),
            transferred=transferred,
            remaining=ram.remaining if ram else (previous.remaining if previous else 0),
            total=ram.total if ram else (previous.total if previous else 0),
            dirty_pages_rate=ram.dirty_pages_rate if ram else 0,
            dirty_bytes_rate=ram.dirty_bytes_rate if ram else 0,
            mbps=ram.mbps if ram else 0.0,
            throughput=round(throughput, 1),
            expected_downtime_ms=info.expected_downtime_ms,
            cpu_throttle=info.cpu_throttle_percentage or 0,
            postcopy_requests=ram.postcopy_requests if ram else 0,
            downtime_ms=info.downtime_ms, total_time_ms=info.total_time_ms,
            normal_bytes=ram.normal_bytes if ram else 0,
            duplicate_pages=ram.duplicate if ram else 0,
            disk_remaining=info.disk.remaining if info.disk else None,
            error=info.error,
        )

    def to_json(self) -> dict[str, Any]:
        return {"kind": "sample", **asdict(self), "status": self.status.value}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Sample:
        fields = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        return cls(**fields)


@dataclass(frozen=True)
class TraceEvent:
    """Something that happened at time ``t``: a QMP event, or a decision kvmshell took (with why)."""

    t: float
    source: str                    # "qemu" or "kvmshell"
    name: str                      # MIGRATION, MIGRATION_PASS, STOP... or decision names
    detail: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"kind": "event", "t": round(self.t, 4), "source": self.source, "name": self.name,
                "detail": self.detail}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> TraceEvent:
        return cls(float(d["t"]), str(d.get("source", "qemu")), str(d["name"]), dict(d.get("detail", {})))


@dataclass(frozen=True)
class TraceHeader:
    guest: str
    started: float                 # epoch seconds
    ram_bytes: int = 0
    params: dict[str, Any] = field(default_factory=dict)     # max-bandwidth, downtime-limit...
    capabilities: dict[str, bool] = field(default_factory=dict)
    strategy: str = ""
    link_bytes_per_s: float | None = None
    note: str = ""

    def to_json(self) -> dict[str, Any]:
        return {"kind": "header", "version": TRACE_VERSION, **asdict(self)}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> TraceHeader:
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})


class SampleRing:
    """The last ``size`` samples, oldest first."""

    def __init__(self, size: int = 4096) -> None:
        self._items: deque[Sample] = deque(maxlen=size)

    def append(self, sample: Sample) -> None:
        self._items.append(sample)

    def __iter__(self) -> Iterator[Sample]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    @property
    def last(self) -> Sample | None:
        return self._items[-1] if self._items else None

    def at_least(self, seconds: float, now: float) -> Sample | None:
        """The newest sample taken ``seconds`` or more before ``now`` (else the oldest)."""
        for s in reversed(self._items):
            if s.t <= now - seconds:
                return s
        return self._items[0] if self._items else None

    def list(self) -> list[Sample]:
        return list(self._items)


class TraceWriter:
    """Writes a trace as JSON lines, flushing each line (a crash leaves a readable file)."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream

    @classmethod
    def open(cls, path: str | Path) -> TraceWriter:
        return cls(open(path, "w", encoding="utf-8"))

    def write(self, item: Sample | TraceEvent | TraceHeader) -> None:
        self._stream.write(json.dumps(item.to_json(), sort_keys=True) + "\n")
        self._stream.flush()

    def close(self) -> None:
        self._stream.close()


@dataclass(frozen=True)
class Trace:
    header: TraceHeader
    samples: tuple[Sample, ...]
    events: tuple[TraceEvent, ...]


def read_trace(lines: Iterable[str], where: str = "trace") -> Trace:
    """Parse a trace; ValueError naming the line for anything malformed."""
    header: TraceHeader | None = None
    samples: list[Sample] = []
    events: list[TraceEvent] = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            d = json.loads(line)
            kind = d.get("kind")
            if kind == "header":
                header = TraceHeader.from_json(d)
            elif kind == "sample":
                samples.append(Sample.from_json(d))
            elif kind == "event":
                events.append(TraceEvent.from_json(d))
            else:
                raise ValueError(f"unknown kind {kind!r}")
        except (ValueError, TypeError, KeyError, AttributeError) as e:
            raise ValueError(f"{where}:{number}: not a kvmshell trace line ({e})") from None
    if header is None:
        raise ValueError(f"{where}: no header line: not a kvmshell trace")
    return Trace(header, tuple(samples), tuple(events))


def load_trace(path: str | Path) -> Trace:
    with open(path, encoding="utf-8") as f:
        return read_trace(f, str(path))
