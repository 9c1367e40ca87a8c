"""HMP's human-readable text, parsed into the same typed objects that QMP gives (pure functions).

Formats are those of QEMU 7.2's hmp-cmds.c and of later releases where they differ only in spacing.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from datetime import datetime
from types import MappingProxyType

from kvmshell.errors import UsageError
from kvmshell.core.values.models import (
    Capabilities, DirtyRateInfo, DiskStats, MigrationInfo, MigrationParameters, MigrationStatus, QemuVersion,
    RamStats, RunState, Snapshot, Status,
)

ANSI_RE = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b[()][A-Za-z0-9]|\x1b[=>]")

# First lines that mean "this command failed" whatever the command.
_ERROR_PREFIXES = ("Error: ", "unknown command: ", "Unknown command: ")
_TRY_HELP_RE = re.compile(r'^Try "help [^"]*" for more information$', re.M)
# Messages some commands print without any "Error:" prefix.
_BARE_ERRORS = (
    "no block device can store vmstate",
    "Device '", "No block device",
)


def strip_ansi(text: str) -> str:
    return ANSI_RE.sub("", text)


def error_in(output: str) -> str | None:
    """The error message if an HMP reply reports a failure, else None."""
    text = output.strip()
    if not text:
        return None
    first = text.splitlines()[0].strip()
    if first.startswith(_ERROR_PREFIXES):
        return first.removeprefix("Error: ")
    if _TRY_HELP_RE.search(text):
        lines = [ln for ln in text.splitlines() if ln.strip() and not _TRY_HELP_RE.match(ln)]
        return "; ".join(lines) or first
    if first.startswith(_BARE_ERRORS):
        return first
    return None


def parse_status(text: str) -> Status:
    """``VM status: running`` / ``VM status: paused`` / ``VM status: paused (restore-vm)``."""
    m = re.search(r"VM status:\s*(\w[\w-]*)(?:\s*\(([\w-]+)\))?", text)
    if not m:
        raise ValueError(f"unexpected 'info status' reply: {text.strip()[:80]!r}")
    word, detail = m.group(1), m.group(2)
    if word == "running":
        return Status(True, RunState.RUNNING)
    return Status(False, RunState(detail) if detail else RunState.PAUSED)


def parse_version(text: str) -> QemuVersion:
    """``7.2.22Debian 1:7.2+dfsg-7`` (7.2 glues the package on) or ``8.2.0 (v8.2.0)``."""
    m = re.match(r"\s*(\d+)\.(\d+)\.(\d+)\s*(.*)", text)
    if not m:
        raise ValueError(f"unexpected 'info version' reply: {text.strip()[:80]!r}")
    return QemuVersion(int(m.group(1)), int(m.group(2)), int(m.group(3)), m.group(4).strip())


def _key_values(text: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            out[key.strip()] = value.strip()
    return out


_UNIT_BYTES = {"": 1, "b": 1, "bytes": 1, "kbytes": 1024, "kib": 1024, "mib": 1024**2, "gib": 1024**3}


def _bytes_value(v: str) -> int:
    m = re.match(r"(\d+)\s*([A-Za-z]*)", v)
    if not m:
        return 0
    return int(m.group(1)) * _UNIT_BYTES.get(m.group(2).lower(), 1)


def _num(v: str | None) -> int | None:
    if v is None:
        return None
    m = re.match(r"-?\d+", v.strip())
    return int(m.group(0)) if m else None


def _float(v: str | None) -> float:
    m = re.match(r"\d+(?:\.\d+)?", (v or "").strip())
    return float(m.group(0)) if m else 0.0


def parse_migrate(text: str) -> MigrationInfo:
    """``info migrate``. Idle guests print only the globals section."""
    kv = _key_values(text)
    status_text = kv.get("Migration status")
    if status_text is None:
        return MigrationInfo(MigrationStatus.NONE)
    m = re.match(r"([\w-]+)(?:\s*\((.*)\))?", status_text)
    status = MigrationStatus(m.group(1)) if m else MigrationStatus.UNKNOWN
    error = m.group(2) if m and m.group(2) else None
    ram = None
    if "transferred ram" in kv or "remaining ram" in kv:
        ram = RamStats(
            transferred=_bytes_value(kv.get("transferred ram", "0")),
            remaining=_bytes_value(kv.get("remaining ram", "0")),
            total=_bytes_value(kv.get("total ram", "0")),
            duplicate=_num(kv.get("duplicate")) or 0,
            normal=_num(kv.get("normal")) or 0,
            normal_bytes=_bytes_value(kv.get("normal bytes", "0")),
            dirty_pages_rate=_num(kv.get("dirty pages rate")) or 0,
            mbps=_float(kv.get("throughput")),
            dirty_sync_count=_num(kv.get("dirty sync count")) or 0,
            page_size=_bytes_value(kv.get("page size", "4 kbytes")) or 4096,
            pages_per_second=_num(kv.get("pages-per-second")) or 0,
            postcopy_requests=_num(kv.get("postcopy request count")) or 0,
            precopy_bytes=_bytes_value(kv["precopy ram"]) if "precopy ram" in kv else None,
            downtime_bytes=_bytes_value(kv["downtime ram"]) if "downtime ram" in kv else None,
            postcopy_bytes=_bytes_value(kv["postcopy ram"]) if "postcopy ram" in kv else None,
        )
    disk = None
    if "transferred disk" in kv:
        disk = DiskStats(_bytes_value(kv.get("transferred disk", "0")),
                         _bytes_value(kv.get("remaining disk", "0")),
                         _bytes_value(kv.get("total disk", "0")))
    blocked = ()
    if "Outgoing migration blocked" in kv:
        blocked = tuple(r.strip() for r in kv["Outgoing migration blocked"].split("\n") if r.strip())
    return MigrationInfo(
        status=status, ram=ram, disk=disk,
        total_time_ms=_num(kv.get("total time")),
        expected_downtime_ms=_num(kv.get("expected downtime")),
        downtime_ms=_num(kv.get("downtime")),
        setup_time_ms=_num(kv.get("setup")),
        cpu_throttle_percentage=_num(kv.get("cpu throttle percentage")),
        blocked_reasons=blocked,
        error=error,
    )


def parse_migrate_parameters(text: str) -> MigrationParameters:
    """``info migrate_parameters``: ``max-bandwidth: 134217728 bytes/second``, ``tls-creds: ''``..."""
    vals: dict[str, int | bool | str] = {}
    for key, value in _key_values(text).items():
        if value in ("on", "off"):
            vals[key] = value == "on"
        elif re.fullmatch(r"-?\d+(?: [A-Za-z/]+)?", value):
            vals[key] = int(value.split()[0])
        else:
            vals[key] = value.strip("'")
    return MigrationParameters(MappingProxyType(vals))


def parse_migrate_capabilities(text: str) -> Capabilities:
    states = {k: v == "on" for k, v in _key_values(text).items() if v in ("on", "off")}
    return Capabilities(MappingProxyType(states))


_SNAP_RE = re.compile(
    r"^(?P<id>\S+)\s+(?P<tag>.+?)\s+(?P<size>[\d.]+\s*[KMGT]?i?B)\s+"
    r"(?P<date>\d{4}-\d\d-\d\d \d\d:\d\d:\d\d)\s+(?P<clock>\d+:\d\d:\d\d\.\d+)(?:\s+\S+)?\s*$")
_SIZE_UNITS = {"B": 1, "KiB": 1024, "MiB": 1024**2, "GiB": 1024**3, "TiB": 1024**4}


def parse_snapshots(text: str) -> tuple[Snapshot, ...]:
    """``info snapshots``. Lists the snapshots present on all disks; IDs show as ``--``."""
    if "There is no snapshot available" in text or "no block device can store vmstate" in text:
        return ()
    snaps: list[Snapshot] = []
    section = text.split("List of partial", 1)[0]
    for line in section.splitlines():
        m = _SNAP_RE.match(line.rstrip())
        if not m:
            continue
        num, unit = re.match(r"([\d.]+)\s*(\S+)", m.group("size")).groups()
        size = int(float(num) * _SIZE_UNITS.get(unit, 1))
        date = int(datetime.strptime(m.group("date"), "%Y-%m-%d %H:%M:%S").timestamp())
        h, mi, s = m.group("clock").split(":")
        clock_ns = int((int(h) * 3600 + int(mi) * 60 + float(s)) * 1e9)
        snaps.append(Snapshot(id="" if m.group("id") == "--" else m.group("id"), tag=m.group("tag"),
                              vm_state_size=size, date_sec=date, vm_clock_ns=clock_ns))
    return tuple(snaps)


def parse_dirty_rate(text: str) -> DirtyRateInfo:
    """``info dirty_rate``: ``Status: measured``, ``Period: 1 (sec)``, ``Dirty rate: 99 (MB/s)``
    (``(not ready)`` while measuring)..."""
    kv = _key_values(text)
    if "Status" not in kv:
        raise ValueError(f"unexpected 'info dirty_rate' reply: {text.strip()[:80]!r}")
    return DirtyRateInfo(status=kv["Status"].split()[0] if kv["Status"] else "unstarted",
                         dirty_rate_mb=_num(kv.get("Dirty rate")), calc_time_s=_num(kv.get("Period")),
                         sample_pages=_num(kv.get("Sample Pages")), mode=kv.get("Mode") or None,
                         start_time=_num(kv.get("Start Time")))


def parse_cpu_count(text: str) -> int:
    """``info cpus``: one ``* CPU #0: thread_id=...`` line per vCPU."""
    return sum(1 for line in text.splitlines() if "CPU #" in line)


def parse_memory_size(text: str) -> int:
    """``info memory_size_summary``: ``base memory: 134217728``; the base memory in bytes."""
    m = re.search(r"base memory:\s*(\d+)", text)
    if not m:
        raise ValueError(f"unexpected 'info memory_size_summary' reply: {text.strip()[:80]!r}")
    return int(m.group(1))


def parse_qom_list(text: str) -> dict[str, str]:
    """``qom-list PATH``: ``net0 (child<virtio-net-pci>)`` per line; {name: type}."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        name, sep, kind = line.strip().partition(" (")
        if sep and name:
            out[name] = kind.removesuffix(")")
    return out


class ControlCharacter(UsageError, ValueError):
    """A word for an HMP command line holds a control character (a newline would end the command
    there and start another one)."""


def _plain(word: str) -> str:
    """``word`` unchanged; ControlCharacter when it holds one (newline, CR, NUL, ESC, DEL...)."""
    bad = next((c for c in word if ord(c) < 0x20 or 0x7f <= ord(c) < 0xa0), None)
    if bad is not None:
        raise ControlCharacter(f"{word!r} holds the control character {bad!r}: an HMP command line cannot carry "
                               "it; nothing was sent, use printable characters only")
    return word


def keyval(props: Mapping[str, object]) -> str:
    """Properties as QEMU's keyval syntax reads them (object_add, device_add): commas doubled."""
    def text(v: object) -> str:
        return _plain(("on" if v else "off") if isinstance(v, bool) else str(v))
    return ",".join(f"{_plain(k)}={text(v).replace(',', ',,')}" for k, v in props.items())


def quote(word: str) -> str:
    """A word as HMP's parser reads it back (quotes when it is empty or has spaces or quotes);
    ControlCharacter for a word with a control character, which no quoting carries safely."""
    _plain(word)
    if word and not any(c.isspace() or c in "\"'\\" for c in word):
        return word
    return '"' + word.replace("\\", "\\\\").replace('"', '\\"') + '"'


def parse_help(text: str) -> frozenset[str]:
    """Command names from ``help``: the first word of each line that starts at column 0."""
    names: set[str] = set()
    for line in text.splitlines():
        if line and not line[0].isspace():
            word = line.split(None, 1)[0]
            if re.fullmatch(r"[a-z_][\w-]*(?:\|[a-z_][\w-]*)*", word):
                names.update(word.split("|"))
    return frozenset(names)
