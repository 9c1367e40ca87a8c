"""Argument values: sizes, rates, durations, on/off. Pure; raise ValueError with a message
that says what was expected."""

from __future__ import annotations

import math
import re

SIZE_UNITS = {"": None, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_SIZE_RE = re.compile(r"(\d+(?:\.\d*)?|\.\d+)\s*([BKMGT]?)(?:I?B)?", re.I)


def parse_size(text: str, bare_unit: str = "B") -> int:
    """``1G``, ``512M``, ``1.5g``, ``100`` (a bare number counts in ``bare_unit``). Powers of 1024,
    as QEMU's HMP does. Never negative."""
    t = text.strip()
    if t.startswith("-"):
        raise ValueError(f"{text!r} is negative: a size must be 0 or more")
    m = _SIZE_RE.fullmatch(t)
    if not m:
        raise ValueError(f"{text!r} is not a size (a number with an optional suffix B, K, M, G or T, e.g. 1G)")
    unit = m.group(2).upper()
    factor = SIZE_UNITS[unit] or SIZE_UNITS[bare_unit.upper()]
    assert factor is not None
    value = float(m.group(1)) * factor
    if not math.isfinite(value) or value >= 2**63:
        raise ValueError(f"{text!r} is too large")
    return int(value)


def parse_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{text!r} is not a number of seconds (e.g. 0.3)") from None
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{text!r}: seconds must be a finite number, 0 or more")
    return value


def parse_on_off(text: str) -> bool:
    t = text.strip().lower()
    if t in ("on", "true", "yes", "1"):
        return True
    if t in ("off", "false", "no", "0"):
        return False
    raise ValueError(f"{text!r}: expected on or off")


def parse_positive_int(text: str, what: str = "value") -> int:
    if not re.fullmatch(r"\d+", text.strip()) or int(text) <= 0:
        raise ValueError(f"{text!r}: {what} must be a whole number above 0")
    return int(text)


_BITS_RE = re.compile(r"(\d+(?:\.\d*)?)\s*([kmgt]?)bit(?:/s|ps)?", re.I)


def parse_rate(text: str) -> int:
    """A transfer rate in bytes/s: ``1gbit``/``100mbit`` (bits per second, powers of 1000, as links are
    sold), or a size per second ``1G``/``512M`` (bytes, powers of 1024; a bare number is MiB/s)."""
    t = text.strip()
    m = _BITS_RE.fullmatch(t)
    if m:
        factor = {"": 1, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12}[m.group(2).lower()]
        value = int(float(m.group(1)) * factor / 8)
        if value <= 0:
            raise ValueError(f"{text!r}: a rate must be above 0")
        return value
    value = parse_size(t, bare_unit="M")
    if value <= 0:
        raise ValueError(f"{text!r}: a rate must be above 0")
    return value


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def format_rate(n: int) -> str:
    """A rate in bytes/s as ``parse_rate`` reads it back: link speeds in bits (``1gbit``, ``100mbit``),
    else binary sizes per second (``30M``), else bytes (``123B``)."""
    for unit, bits in (("gbit", 10**9), ("mbit", 10**6)):
        if n > 0 and (n * 8) % bits == 0:
            return f"{n * 8 // bits}{unit}"
    for unit, size in (("T", 1 << 40), ("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if n > 0 and n % size == 0:
            return f"{n // size}{unit}"
    return f"{n}B"
