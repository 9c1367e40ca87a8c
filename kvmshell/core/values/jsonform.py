"""The JSON form of kvmshell's values (for `--json`): numbers stay numbers and every key of a
quantity names its unit (``total_s``, ``downtime_ms``, ``ram_bytes``, ``rate_bytes_per_s``).

``as_json`` walks dataclasses, enums, sequences and mappings; a field whose name does not say its
unit is renamed through ``RENAMES``, so a new field needs a name with its unit, or a line here."""

from __future__ import annotations

import enum
import math
from collections.abc import Mapping
from dataclasses import fields, is_dataclass
from typing import Any

# field name -> key: the unit said in the name
RENAMES = {
    # model (Prediction, Estimate)
    "bytes_total": "total_bytes", "working_set": "working_set_bytes", "dirty_rate": "dirty_rate_bytes_per_s",
    "rate": "rate_bytes_per_s", "link": "link_bytes_per_s", "bandwidth_needed": "bandwidth_needed_bytes_per_s",
    "bytes_sent": "sent_bytes",
    # QEMU's statistics (MigrationInfo, RamStats, DiskStats)
    "transferred": "transferred_bytes", "remaining": "remaining_bytes", "total": "total_bytes",
    "duplicate": "duplicate_pages", "normal": "normal_pages", "dirty_pages_rate": "dirty_pages_rate_pages_per_s",
    "mbps": "throughput_mbit_per_s", "page_size": "page_size_bytes", "pages_per_second": "pages_per_s",
    "cpu_throttle_percentage": "cpu_throttle_percent", "dirty_sync_count": "passes",
    "postcopy_requests": "postcopy_requests_count",
}
# the suffixes that say a unit; counts end in "_count" or are "passes"
UNIT_SUFFIXES = ("_s", "_ms", "_ns", "_bytes", "_bytes_per_s", "_pages", "_pages_per_s", "_percent", "_mbit_per_s",
                 "_count", "_mb_per_s")
UNITLESS = ("passes", "pid", "vcpus", "bytes")


def says_unit(key: str) -> bool:
    """Whether a key of a number says what the number counts."""
    return key in UNITLESS or key.endswith(UNIT_SUFFIXES)


def as_json(value: Any) -> Any:
    if is_dataclass(value) and not isinstance(value, type):
        return {RENAMES.get(f.name, f.name): as_json(getattr(value, f.name)) for f in fields(value)
                if not f.name.startswith("_")}
    if isinstance(value, enum.Enum):
        return as_json(value.value)
    if isinstance(value, Mapping):
        return {str(k): as_json(v) for k, v in value.items()}     # keys as given (QEMU's names stay)
    if isinstance(value, (list, tuple)):
        return [as_json(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None                    # JSON has no infinity
    return value
