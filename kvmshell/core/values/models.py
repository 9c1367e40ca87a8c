"""Typed views of what QEMU reports, parsed once from QMP replies (``from_qmp``).

The HMP text parsers in ``hmptext`` build the same objects, so callers never care which protocol
a guest speaks. QMP dicts do not leave ``core``.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any


class _Lenient(enum.Enum):
    """An enum that maps values it does not know (newer QEMU) to UNKNOWN instead of failing."""

    @classmethod
    def _missing_(cls, value: object) -> Any:
        return cls.__members__.get("UNKNOWN")

    def __str__(self) -> str:
        return str(self.value)


class RunState(_Lenient):
    DEBUG = "debug"
    INMIGRATE = "inmigrate"
    INTERNAL_ERROR = "internal-error"
    IO_ERROR = "io-error"
    PAUSED = "paused"
    POSTMIGRATE = "postmigrate"
    PRELAUNCH = "prelaunch"
    FINISH_MIGRATE = "finish-migrate"
    RESTORE_VM = "restore-vm"
    RUNNING = "running"
    SAVE_VM = "save-vm"
    SHUTDOWN = "shutdown"
    SUSPENDED = "suspended"
    WATCHDOG = "watchdog"
    GUEST_PANICKED = "guest-panicked"
    COLO = "colo"
    UNKNOWN = "unknown"


@dataclass(frozen=True)
class Status:
    running: bool
    state: RunState

    @classmethod
    def from_qmp(cls, d: Mapping[str, Any]) -> Status:
        return cls(running=bool(d.get("running")), state=RunState(d.get("status", "unknown")))

    def __str__(self) -> str:
        if self.state is RunState.RUNNING:
            return "running"
        return "paused" if self.state is RunState.PAUSED else f"paused ({self.state.value})"


@dataclass(frozen=True, order=True)
class QemuVersion:
    major: int
    minor: int
    micro: int
    package: str = field(default="", compare=False)

    @classmethod
    def from_qmp(cls, d: Mapping[str, Any]) -> QemuVersion:
        q = d.get("qemu", {})
        return cls(int(q.get("major", 0)), int(q.get("minor", 0)), int(q.get("micro", 0)),
                   str(d.get("package", "")).strip())

    def __str__(self) -> str:
        return f"{self.major}.{self.minor}.{self.micro}"


class MigrationStatus(_Lenient):
    NONE = "none"
    SETUP = "setup"
    CANCELLING = "cancelling"
    CANCELLED = "cancelled"
    ACTIVE = "active"
    POSTCOPY_ACTIVE = "postcopy-active"
    POSTCOPY_PAUSED = "postcopy-paused"
    POSTCOPY_RECOVER = "postcopy-recover"
    COMPLETED = "completed"
    FAILED = "failed"
    COLO = "colo"
    PRE_SWITCHOVER = "pre-switchover"
    DEVICE = "device"
    WAIT_UNPLUG = "wait-unplug"
    UNKNOWN = "unknown"

    @property
    def is_active(self) -> bool:
        """A migration is under way (not idle, not finished)."""
        return self in _ACTIVE

    @property
    def is_postcopy(self) -> bool:
        return self.value.startswith("postcopy-")

    @property
    def is_finished(self) -> bool:
        return self in (MigrationStatus.COMPLETED, MigrationStatus.FAILED, MigrationStatus.CANCELLED)


_ACTIVE = frozenset({
    MigrationStatus.SETUP, MigrationStatus.ACTIVE, MigrationStatus.POSTCOPY_ACTIVE,
    MigrationStatus.POSTCOPY_PAUSED, MigrationStatus.POSTCOPY_RECOVER, MigrationStatus.PRE_SWITCHOVER,
    MigrationStatus.DEVICE, MigrationStatus.WAIT_UNPLUG, MigrationStatus.CANCELLING,
    MigrationStatus.COLO,
})


def _int(d: Mapping[str, Any], key: str) -> int | None:
    v = d.get(key)
    return int(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


@dataclass(frozen=True)
class RamStats:
    transferred: int = 0
    remaining: int = 0
    total: int = 0
    duplicate: int = 0               # zero pages
    normal: int = 0                  # full pages sent
    normal_bytes: int = 0
    dirty_pages_rate: int = 0        # pages/s, 0 during the first pass
    mbps: float = 0.0                # throughput as QEMU computes it (megabits/s)
    dirty_sync_count: int = 0        # the pass number
    page_size: int = 4096
    pages_per_second: int = 0
    postcopy_requests: int = 0
    precopy_bytes: int | None = None
    downtime_bytes: int | None = None
    postcopy_bytes: int | None = None

    @property
    def dirty_bytes_rate(self) -> int:
        return self.dirty_pages_rate * self.page_size

    @classmethod
    def from_qmp(cls, d: Mapping[str, Any]) -> RamStats:
        return cls(
            transferred=_int(d, "transferred") or 0,
            remaining=_int(d, "remaining") or 0,
            total=_int(d, "total") or 0,
            duplicate=_int(d, "duplicate") or 0,
            normal=_int(d, "normal") or 0,
            normal_bytes=_int(d, "normal-bytes") or 0,
            dirty_pages_rate=_int(d, "dirty-pages-rate") or 0,
            mbps=float(d.get("mbps") or 0.0),
            dirty_sync_count=_int(d, "dirty-sync-count") or 0,
            page_size=_int(d, "page-size") or 4096,
            pages_per_second=_int(d, "pages-per-second") or 0,
            postcopy_requests=_int(d, "postcopy-requests") or 0,
            precopy_bytes=_int(d, "precopy-bytes"),
            downtime_bytes=_int(d, "downtime-bytes"),
            postcopy_bytes=_int(d, "postcopy-bytes"),
        )


@dataclass(frozen=True)
class DiskStats:
    transferred: int = 0
    remaining: int = 0
    total: int = 0

    @classmethod
    def from_qmp(cls, d: Mapping[str, Any]) -> DiskStats:
        return cls(_int(d, "transferred") or 0, _int(d, "remaining") or 0, _int(d, "total") or 0)


@dataclass(frozen=True)
class MigrationInfo:
    status: MigrationStatus
    ram: RamStats | None = None
    disk: DiskStats | None = None
    total_time_ms: int | None = None
    expected_downtime_ms: int | None = None
    downtime_ms: int | None = None
    setup_time_ms: int | None = None
    cpu_throttle_percentage: int | None = None
    blocked_reasons: tuple[str, ...] = ()
    error: str | None = None

    @classmethod
    def from_qmp(cls, d: Mapping[str, Any]) -> MigrationInfo:
        ram = d.get("ram")
        disk = d.get("disk")
        return cls(
            status=MigrationStatus(d.get("status", "none")),
            ram=RamStats.from_qmp(ram) if isinstance(ram, Mapping) else None,
            disk=DiskStats.from_qmp(disk) if isinstance(disk, Mapping) else None,
            total_time_ms=_int(d, "total-time"),
            expected_downtime_ms=_int(d, "expected-downtime"),
            downtime_ms=_int(d, "downtime"),
            setup_time_ms=_int(d, "setup-time"),
            cpu_throttle_percentage=_int(d, "cpu-throttle-percentage"),
            blocked_reasons=tuple(str(r) for r in d.get("blocked-reasons", ()) or ()),
            error=d.get("error-desc"),
        )


ParamValue = int | bool | str
# the migration parameters that hold a size or a bandwidth (bytes, bytes/s)
SIZE_PARAMETERS = frozenset({"max-bandwidth", "max-postcopy-bandwidth", "avail-switchover-bandwidth",
                             "xbzrle-cache-size"})


@dataclass(frozen=True)
class MigrationParameters:
    """``query-migrate-parameters``: the names are QEMU's own (``max-bandwidth``, ``downtime-limit``...)."""

    values: Mapping[str, ParamValue]

    @classmethod
    def from_qmp(cls, d: Mapping[str, Any]) -> MigrationParameters:
        vals = {k: v for k, v in d.items() if isinstance(v, (int, bool, str))}
        return cls(MappingProxyType(vals))

    def get(self, name: str) -> ParamValue | None:
        return self.values.get(name)

    @property
    def max_bandwidth(self) -> int | None:
        v = self.values.get("max-bandwidth")
        return v if isinstance(v, int) and not isinstance(v, bool) else None

    @property
    def downtime_limit_ms(self) -> int | None:
        v = self.values.get("downtime-limit")
        return v if isinstance(v, int) and not isinstance(v, bool) else None


@dataclass(frozen=True)
class Capabilities:
    """``query-migrate-capabilities``: capability name -> on/off."""

    states: Mapping[str, bool]

    @classmethod
    def from_qmp(cls, items: Any) -> Capabilities:
        return cls(MappingProxyType({str(i["capability"]): bool(i["state"]) for i in items}))

    def __getitem__(self, name: str) -> bool:
        return self.states[name]

    def __contains__(self, name: object) -> bool:
        return name in self.states


@dataclass(frozen=True)
class Snapshot:
    id: str
    tag: str
    vm_state_size: int        # bytes
    date_sec: int             # seconds since the epoch
    vm_clock_ns: int

    @classmethod
    def from_qmp(cls, d: Mapping[str, Any]) -> Snapshot:
        return cls(
            id=str(d.get("id", "")), tag=str(d.get("name", "")),
            vm_state_size=_int(d, "vm-state-size") or 0,
            date_sec=_int(d, "date-sec") or 0,
            vm_clock_ns=(_int(d, "vm-clock-sec") or 0) * 1_000_000_000 + (_int(d, "vm-clock-nsec") or 0),
        )


@dataclass(frozen=True)
class BlockImage:
    """An image file as ``query-block`` describes it: a drive's top image or one under it."""

    filename: str
    format: str              # qcow2, raw...
    virtual_size: int        # bytes the guest sees

    @classmethod
    def from_qmp(cls, d: Mapping[str, Any]) -> BlockImage:
        return cls(str(d.get("filename", "")), str(d.get("format", "")), _int(d, "virtual-size") or 0)


@dataclass(frozen=True)
class BlockDevice:
    """One drive of ``query-block``: its ids, its root node and the images in it."""

    device: str                          # the drive id ("" for a drive made with -blockdev)
    qdev: str                            # the guest device's id, or its QOM path
    node_name: str                       # the root node ("" without a medium)
    writable: bool                       # a medium is in, opened read-write
    image: BlockImage | None             # the top image; None without a medium (an empty CD-ROM)
    backing: tuple[BlockImage, ...] = ()     # the backing chain under ``image``, nearest first

    @property
    def key(self) -> str:
        """The drive id, or the device's when the drive has none: what names a disk on both guests."""
        return self.device or self.qdev

    @classmethod
    def from_qmp(cls, d: Mapping[str, Any]) -> BlockDevice:
        inserted = d.get("inserted")
        if not isinstance(inserted, Mapping):
            return cls(str(d.get("device", "")), str(d.get("qdev", "")), "", False, None)
        top = inserted.get("image", {})
        chain: list[BlockImage] = []
        below = top.get("backing-image")
        while isinstance(below, Mapping):
            chain.append(BlockImage.from_qmp(below))
            below = below.get("backing-image")
        image = BlockImage.from_qmp(top) if top else BlockImage(str(inserted.get("file", "")),
                                                                str(inserted.get("drv", "")), 0)
        return cls(str(d.get("device", "")), str(d.get("qdev", "")), str(inserted.get("node-name", "")),
                   not inserted.get("ro"), image, tuple(chain))


class BlockJobStatus(_Lenient):
    """A block job's state (QEMU's JobStatus)."""

    UNDEFINED = "undefined"
    CREATED = "created"
    RUNNING = "running"
    PAUSED = "paused"
    READY = "ready"
    STANDBY = "standby"
    WAITING = "waiting"
    PENDING = "pending"
    ABORTING = "aborting"
    CONCLUDED = "concluded"
    NULL = "null"
    UNKNOWN = "unknown"


@dataclass(frozen=True)
class BlockJob:
    """One job of ``query-block-jobs`` (a mirror, a commit, a stream...)."""

    id: str                  # the job id (QEMU's ``device``: the drive's name when none was given)
    type: str                # mirror, commit, stream, backup
    status: BlockJobStatus
    ready: bool              # a mirror in sync: completing or cancelling it now gives a consistent copy
    busy: bool               # copying right now (False while it sleeps to keep to its speed)
    paused: bool
    offset: int              # bytes done
    length: int              # ... of this many (a mirror's grows with what the guest writes)
    speed: int               # its rate limit, bytes/s (0: none)
    io_status: str = "ok"
    error: str | None = None

    @classmethod
    def from_qmp(cls, d: Mapping[str, Any]) -> BlockJob:
        error = d.get("error")
        return cls(id=str(d.get("device", "")), type=str(d.get("type", "")),
                   status=BlockJobStatus(d.get("status", "unknown")), ready=bool(d.get("ready")),
                   busy=bool(d.get("busy")), paused=bool(d.get("paused")), offset=_int(d, "offset") or 0,
                   length=_int(d, "len") or 0, speed=_int(d, "speed") or 0,
                   io_status=str(d.get("io-status", "ok")), error=str(error) if error is not None else None)


@dataclass(frozen=True)
class NbdServer:
    """Where an NBD server listens: a unix socket ``path``, or TCP ``host``:``port``."""

    path: str | None = None
    host: str | None = None
    port: int | None = None
    tls_creds: str | None = None      # the tls-creds-x509 object the server (or the client) uses
    tls_authz: str | None = None      # the server admits only the client this authz object names
    tls_hostname: str | None = None   # the client checks the server's certificate for this name

    def uri(self, export: str) -> str:
        """The NBD URI of ``export`` on this server (what drive-mirror and qemu-img take)."""
        if self.path is not None:
            return f"nbd+unix:///{export}?socket={self.path}"
        host = f"[{self.host}]" if self.host and ":" in self.host else self.host
        return f"nbd://{host}:{self.port}/{export}"

    def __str__(self) -> str:
        where = f"unix:{self.path}" if self.path is not None else f"tcp:{self.host}:{self.port}"
        return f"{where} in TLS" if self.tls_creds else where


@dataclass(frozen=True)
class DirtyRateInfo:
    """``query-dirty-rate``: the state of the last calc-dirty-rate and, once measured, its result."""

    status: str                      # unstarted / measuring / measured
    dirty_rate_mb: int | None = None     # MB/s (QEMU's MiB), once measured
    calc_time_s: int | None = None
    sample_pages: int | None = None      # per GiB, in page-sampling mode
    mode: str | None = None
    start_time: int | None = None

    @property
    def measured(self) -> bool:
        return self.status == "measured" and self.dirty_rate_mb is not None

    @property
    def bytes_per_s(self) -> float | None:
        return float(self.dirty_rate_mb) * 2**20 if self.dirty_rate_mb is not None else None

    @classmethod
    def from_qmp(cls, d: Mapping[str, Any]) -> DirtyRateInfo:
        mode = d.get("mode")
        return cls(status=str(d.get("status", "unstarted")), dirty_rate_mb=_int(d, "dirty-rate"),
                   calc_time_s=_int(d, "calc-time"), sample_pages=_int(d, "sample-pages"),
                   mode=str(mode) if mode is not None else None, start_time=_int(d, "start-time"))


@dataclass(frozen=True)
class DirtyRate:
    """An on-demand calc-dirty-rate measurement (it costs the guest, so never taken continuously)."""

    bytes_per_s: float
    window_s: float
    when: float               # epoch seconds
    mode: str = "page-sampling"       # or dirty-bitmap / dirty-ring: every page counted
    sample_pages: int | None = None   # page sampling: pages read per GiB of RAM


@dataclass(frozen=True)
class DirtyRateMeans:
    """How this guest's QEMU can measure its dirty rate, discovered from the guest (schema, KVM)."""

    modes: tuple[str, ...] = ("page-sampling",)   # the best first
    shortest_s: float = 1.0                       # the shortest window calc-dirty-rate takes
    note: str = ""                                # why a better mode is not used


@dataclass(frozen=True)
class Event:
    """A QMP event (or a state change kvmshell noticed itself) from one guest."""

    guest: str
    name: str
    data: Mapping[str, Any]
    timestamp: float          # seconds since the epoch, from QEMU when it gives one

    @property
    def migration_status(self) -> MigrationStatus | None:
        if self.name == "MIGRATION":
            return MigrationStatus(self.data.get("status", "unknown"))
        return None


@dataclass(frozen=True)
class PageSample:
    """Random guest-physical RAM pages read before a migration: how many are all zero (QEMU sends
    those as a few bytes) and how well the others compress (zlib, level 1)."""

    pages: int                  # pages read
    zero_pages: int             # of them, all zero
    page_size: int              # bytes
    ram_bytes: int              # the guest RAM the pages were drawn from
    compressed_ratio: float | None = None   # compressed / raw size of the non-zero pages read
    when: float = 0.0           # epoch seconds

    @property
    def zero_fraction(self) -> float:
        return self.zero_pages / self.pages if self.pages else 0.0

    @property
    def zero_interval(self) -> tuple[float, float]:
        """The 95 % confidence interval of the zero-page fraction (Wilson score)."""
        return wilson_interval(self.zero_pages, self.pages)


def wilson_interval(hits: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval of a proportion ``hits / n`` (0..1 for no draws)."""
    if n <= 0:
        return 0.0, 1.0
    p = hits / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * ((p * (1 - p) / n + z * z / (4 * n * n)) ** 0.5) / denom
    return max(0.0, centre - half), min(1.0, centre + half)
