"""What a live migration job is asked to do, and what it reports at the end."""

from __future__ import annotations

from dataclasses import dataclass, field

from kvmshell.core.migration.live.limits import SETUP_TIMEOUT
from kvmshell.core.migration.model.predict import Prediction
from kvmshell.core.migration.tls import TlsSetup


@dataclass(frozen=True)
class MigrationRequest:
    source: str
    dest: str | None = None             # an attached guest waiting with -incoming defer
    uri: str | None = None              # where the source connects (None: a free local port)
    listen_uri: str | None = None       # where the destination listens, if not there (the far end of a tunnel)
    strategy: str = "auto"              # a name in core/migration/live/strategies ("none": observe only)
    downtime_ms: int | None = None      # None: keep the guest's own
    bandwidth: int | None = None        # bytes/s; None: uncapped (up to the link)
    link: float | None = None           # bytes/s, if known
    allow_postcopy: bool = False
    trace_path: str | None = None
    interval: float = 0.5
    stall_timeout: float = 10.0         # no progress for this long once the job left setup: cancel
    setup_timeout: float = SETUP_TIMEOUT  # still in setup after this long (libvirt preparing the destination): cancel
    tls: TlsSetup | None = None         # encrypt the stream (tls-creds-x509 on both sides)
    preflight: bool = False             # measure the dirty rate before the start (live/preflight.py): auto acts on it


@dataclass
class MigrationOutcome:
    status: str                          # completed / failed / cancelled / stalled / source-lost / postcopy-paused
    message: str
    total_s: float | None = None
    downtime_ms: int | None = None
    bytes_sent: int | None = None
    at_start: Prediction | None = None
    after_first_pass: Prediction | None = None
    decisions: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)        # what the stages did and undid

    @property
    def ok(self) -> bool:
        return self.status == "completed"

    @property
    def full_message(self) -> str:
        return "; ".join([self.message, *self.notes])
