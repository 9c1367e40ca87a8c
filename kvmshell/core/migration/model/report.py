"""What a migration trace says, in figures and in a picture.

``summarize`` boils a :class:`~kvmshell.core.migration.model.samples.Trace` down to the numbers a person
asks after a run (how long, how much downtime, how many passes, how fast); ``summary_table`` turns
them into human rows; ``render_svg`` draws the run as a self-contained SVG: three panels over a shared
time axis (remaining RAM, dirty rate, throughput) with kvmshell's decisions, pass changes and the
postcopy phase marked. Pure functions, except ``write_report``, the one that touches the disk.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kvmshell.core.migration.model.samples import Sample, Trace, TraceEvent

UNFINISHED = "unfinished"
"""``Summary.outcome`` when the trace ends before the migration finished (or holds no samples)."""

FINISHED = ("completed", "failed", "cancelled")

MIB = 1 << 20
GIB = 1 << 30
MB = 1_000_000                     # rates are in decimal MB/s, as link speeds are quoted


@dataclass(frozen=True)
class Summary:
    guest: str
    outcome: str                   # "completed", "failed", "cancelled", or UNFINISHED
    total_s: float | None          # QEMU's total-time on the last sample if it has one, else its t
    downtime_ms: int | None        # QEMU's downtime (only known after completion)
    bytes_sent: int                # the last sample's transferred
    passes: int                    # the last sample's pass_no
    ram_bytes: int                 # the header's, else the largest sample total
    peak_dirty_bytes_rate: int     # bytes/s
    mean_throughput: float         # bytes/s: bytes_sent / total_s (0.0 when there is no duration)
    peak_throughput: float         # bytes/s: the largest Sample.throughput
    postcopy: bool                 # some sample was in a postcopy-* state
    max_cpu_throttle: int          # percent, 0 if never throttled
    decisions: tuple[str, ...]     # kvmshell's events, "t=1.2s name: reason", in time order


# --- figures ---------------------------------------------------------------------------------------


def _num(v: Any) -> float:
    """A finite float for anything a trace line may hold (read_trace does not check types)."""
    if isinstance(v, bool):
        return float(v)
    try:
        f = float(v)
    except (TypeError, ValueError, OverflowError):
        return 0.0
    return f if math.isfinite(f) else 0.0


def _num_or_nan(v: Any) -> float:
    """Like _num, but NaN for what is not a number (to leave such points out of the picture)."""
    if isinstance(v, bool):
        return math.nan
    try:
        return float(v)
    except (TypeError, ValueError, OverflowError):
        return math.nan


def _int(v: Any) -> int:
    if isinstance(v, int) and not isinstance(v, bool):
        return v
    return int(_num(v))


def _is_postcopy(status: str) -> bool:
    return str(status).startswith("postcopy-")


def final_status(trace: Trace) -> str:
    """The last status the trace shows: the last sample's, unless a QEMU ``MIGRATION`` event
    (``detail["status"]``) at or after that sample says otherwise. "none" for an empty trace."""
    status = trace.samples[-1].status if trace.samples else "none"
    last_t = _num(trace.samples[-1].t) if trace.samples else -math.inf
    for ev in trace.events:
        if (ev.source == "qemu" and ev.name == "MIGRATION" and _num(ev.t) >= last_t
                and isinstance(ev.detail.get("status"), str)):
            status = ev.detail["status"]
    return str(status)


def decision_line(ev: TraceEvent) -> str:
    """``t=1.2s name: reason``; without a ``reason`` in the detail, its other keys as ``k=v``."""
    head = f"t={_num(ev.t):.1f}s {ev.name}"
    reason = ev.detail.get("reason")
    if reason is None and ev.detail:
        reason = ", ".join(f"{k}={v}" for k, v in sorted(ev.detail.items(), key=lambda kv: str(kv[0])))
    return f"{head}: {reason}" if reason not in (None, "") else head


def _decisions(trace: Trace) -> list[TraceEvent]:
    return sorted((e for e in trace.events if e.source == "kvmshell"), key=lambda e: _num(e.t))


def summarize(trace: Trace) -> Summary:
    samples = trace.samples
    last = samples[-1] if samples else None
    status = final_status(trace)
    total_s: float | None = None
    if last is not None:
        total_s = _num(last.total_time_ms) / 1000 if last.total_time_ms is not None else _num(last.t)
    downtime = next((s.downtime_ms for s in reversed(samples) if s.downtime_ms is not None), None)
    bytes_sent = _int(last.transferred) if last else 0
    return Summary(
        guest=str(trace.header.guest),
        outcome=status if status in FINISHED else UNFINISHED,
        total_s=total_s,
        downtime_ms=_int(downtime) if downtime is not None else None,
        bytes_sent=bytes_sent,
        passes=_int(last.pass_no) if last else 0,
        ram_bytes=_int(trace.header.ram_bytes) or max((_int(s.total) for s in samples), default=0),
        peak_dirty_bytes_rate=max((_int(s.dirty_bytes_rate) for s in samples), default=0),
        mean_throughput=bytes_sent / total_s if total_s and total_s > 0 else 0.0,
        peak_throughput=max((_num(s.throughput) for s in samples), default=0.0),
        postcopy=any(_is_postcopy(s.status) for s in samples),
        max_cpu_throttle=max((_int(s.cpu_throttle) for s in samples), default=0),
        decisions=tuple(decision_line(e) for e in _decisions(trace)),
    )


def _fixed(v: float, decimals: int) -> str:
    """``decimals`` places, or three significant digits for numbers too big to read that way."""
    return f"{v:.{decimals}f}" if abs(v) < 1e9 else f"{v:.3g}"


def fmt_size(n: float) -> str:
    return f"{_fixed(n / GIB, 2)} GiB" if abs(n) >= GIB else f"{_fixed(n / MIB, 1)} MiB"


def fmt_rate(bytes_per_s: float) -> str:
    return f"{_fixed(bytes_per_s / MB, 1)} MB/s"


def fmt_seconds(s: float | None) -> str:
    return "-" if s is None else f"{_fixed(s, 2)} s"


def fmt_ms(ms: int | None) -> str:
    return "-" if ms is None else f"{ms} ms"


def summary_table(summary: Summary) -> list[tuple[str, str]]:
    """(label, value) rows for a terminal or a dialog; one ("decision", line) row per decision."""
    s = summary
    rows = [
        ("guest", s.guest),
        ("outcome", s.outcome),
        ("total time", fmt_seconds(s.total_s)),
        ("downtime", fmt_ms(s.downtime_ms)),
        ("guest RAM", fmt_size(s.ram_bytes)),
        ("sent", fmt_size(s.bytes_sent)),
        ("passes", str(s.passes)),
        ("mean throughput", fmt_rate(s.mean_throughput)),
        ("peak throughput", fmt_rate(s.peak_throughput)),
        ("peak dirty rate", fmt_rate(s.peak_dirty_bytes_rate)),
        ("postcopy", "yes" if s.postcopy else "no"),
        ("max CPU throttle", f"{s.max_cpu_throttle}%" if s.max_cpu_throttle else "off"),
    ]
    rows += [("decision", line) for line in s.decisions]
    return rows


def summary_json(summary: Summary) -> dict[str, Any]:
    """The summary for `--json`: numbers as numbers, the unit in each key's name, the decisions a list."""
    s = summary
    return {"guest": s.guest, "outcome": s.outcome, "total_s": s.total_s, "downtime_ms": s.downtime_ms,
            "ram_bytes": s.ram_bytes, "sent_bytes": s.bytes_sent, "passes": s.passes,
            "mean_throughput_bytes_per_s": s.mean_throughput, "peak_throughput_bytes_per_s": s.peak_throughput,
            "peak_dirty_rate_bytes_per_s": s.peak_dirty_bytes_rate, "postcopy": s.postcopy,
            "max_cpu_throttle_percent": s.max_cpu_throttle, "decisions": list(s.decisions)}


# --- the picture -----------------------------------------------------------------------------------

SVG_NS = "http://www.w3.org/2000/svg"

_BAD_XML = re.compile("[^\t\n\r\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")


def _esc(text: Any, limit: int | None = None) -> str:
    """Text made safe for XML content and attribute values (characters XML 1.0 forbids, lone
    surrogates included, become U+FFFD), cut to ``limit`` characters with an ellipsis."""
    s = _BAD_XML.sub("\ufffd", str(text))
    if limit is not None and len(s) > limit:
        s = s[:max(limit - 1, 0)] + "\u2026"
    return (s.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
            .replace('"', "&quot;").replace("'", "&#39;"))


def _c(v: float) -> str:
    """A coordinate: one decimal, never NaN or infinite."""
    if not math.isfinite(v):
        v = 0.0
    s = f"{v:.1f}"
    return s[:-2] if s.endswith(".0") else s


_BIG = 1e300                        # values are clamped to this so the axis arithmetic stays finite


def _clamp(v: float) -> float:
    return max(-_BIG, min(_BIG, v))


def _nice_step(span: float, n: int) -> float:
    rough = span / max(n, 1)
    mag = 10.0 ** math.floor(math.log10(rough))
    for m in (1.0, 2.0, 2.5, 5.0, 10.0):
        if m * mag >= rough * (1 - 1e-9):
            return m * mag
    return 10.0 * mag


def _axis(lo: float, hi: float, n: int, extend: bool) -> tuple[float, float, list[float], float]:
    """(lo, hi, ticks, step): ``n``-ish round ticks; ``extend`` stretches lo/hi out to whole steps."""
    if not hi - lo >= 1e-9:                # equal, or too close to tell apart on a page
        hi = lo + (abs(lo) if abs(lo) >= 1e-9 else 1.0)
    step = _nice_step(hi - lo, n)
    if extend:
        lo, hi = math.floor(lo / step) * step, math.ceil(hi / step) * step
    first = math.ceil(lo / step - 1e-9)
    ticks = []
    k = first
    while k * step <= hi * (1 + 1e-12) + step * 1e-9 and len(ticks) < 50:
        ticks.append(k * step)
        k += 1
    return lo, hi, ticks, step


_SUFFIXES = (("E", 1e18), ("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3))


def _decimals(step: float) -> int:
    for d in range(7):
        if abs(round(step, d) - step) <= step * 1e-6:
            return d
    return 6


def _tick_label(v: float, step: float) -> str:
    if abs(v) < step * 1e-6:
        return "0"
    if step >= 1e4:
        for suffix, scale in _SUFFIXES:
            if step >= scale:
                if step / scale >= 1e4:       # beyond exa: plain scientific notation
                    return f"{v:.3g}"
                return f"{v / scale:.{_decimals(step / scale)}f}{suffix}"
    return f"{v:.{_decimals(step)}f}"


def _thin(points: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
    """Drop points that cannot show: per pixel column keep the first, lowest, highest and last."""
    out: list[tuple[float, float]] = []
    group: list[tuple[float, float]] = []

    def flush() -> None:
        if len(group) <= 4:
            out.extend(group)
        else:
            keep = {0, len(group) - 1,
                    min(range(len(group)), key=lambda i: group[i][1]),
                    max(range(len(group)), key=lambda i: group[i][1])}
            out.extend(group[i] for i in sorted(keep))
        group.clear()

    for p in points:
        if group and math.floor(p[0]) != math.floor(group[0][0]):
            flush()
        group.append(p)
    flush()
    return out


@dataclass(frozen=True)
class _Series:
    key: str
    title: str
    color: str
    value: Callable[[Sample], float]


SERIES = (
    _Series("remaining", "remaining RAM (MiB)", "#2b6cb0", lambda s: _num(s.remaining) / MIB),
    _Series("dirty", "dirty rate (MB/s)", "#dd6b20", lambda s: _num(s.dirty_bytes_rate) / MB),
    _Series("throughput", "throughput (MB/s)", "#2f855a", lambda s: _num(s.throughput) / MB),
)

DECISION_COLOR = "#c53030"
PASS_COLOR = "#a0aec0"
POSTCOPY_COLOR = "#805ad5"
MIN_WIDTH, MIN_HEIGHT = 300, 240


def _title_text(summary: Summary) -> str:
    return (f"{summary.guest} \u00b7 {summary.outcome} \u00b7 total {fmt_seconds(summary.total_s)}"
            f" \u00b7 downtime {fmt_ms(summary.downtime_ms)}")


def _postcopy_spans(samples: Sequence[Sample]) -> list[tuple[float, float]]:
    """(start, end) times of runs of postcopy samples; a run ends at the next sample's t."""
    spans: list[tuple[float, float]] = []
    start: float | None = None
    for s in samples:
        if _is_postcopy(s.status):
            if start is None:
                start = _num(s.t)
        elif start is not None:
            spans.append((start, _num(s.t)))
            start = None
    if start is not None:
        spans.append((start, _num(samples[-1].t)))
    return spans


def render_svg(trace: Trace, width: int = 900, height: int = 520) -> str:
    """The run as a standalone SVG document (a string)."""
    if width < MIN_WIDTH or height < MIN_HEIGHT:
        raise ValueError(f"report: an SVG of {width}x{height} is too small "
                         f"(at least {MIN_WIDTH}x{MIN_HEIGHT})")
    summary = summarize(trace)
    title = _title_text(summary)
    out: list[str] = [
        f'<svg xmlns="{SVG_NS}" width="{width}" height="{height}" viewBox="0 0 {width} {height}" '
        f'role="img" font-family="sans-serif" font-size="11">',
        f"<title>{_esc('migration of ' + title)}</title>",
        f'<rect width="{width}" height="{height}" fill="#ffffff"/>',
        f'<text class="title" x="12" y="22" font-size="14" font-weight="bold" fill="#1a202c">'
        f"{_esc(title, int((width - 24) / 8))}</text>",
    ]
    samples = sorted((s for s in trace.samples if math.isfinite(_num_or_nan(s.t))), key=lambda s: _num(s.t))
    if not samples:
        out.append(f'<text class="empty" x="{width / 2:g}" y="{height / 2:g}" text-anchor="middle" '
                   f'font-size="16" fill="#718096">no samples</text>')
        out.append("</svg>")
        return "\n".join(out) + "\n"

    decisions = [e for e in _decisions(trace) if math.isfinite(_num_or_nan(e.t))]
    times = [_num(s.t) for s in samples] + [_num(e.t) for e in decisions]
    left, right, top, bottom = 64, 18, 52, 38
    pw = width - left - right
    t_lo, t_hi, x_ticks, x_step = _axis(_clamp(min(0.0, *times)), _clamp(max(times)), max(2, pw // 110),
                                        extend=False)
    slot = (height - top - bottom) / 3
    panels = [(top + i * slot + 18, top + (i + 1) * slot - 8) for i in range(3)]   # (y0, y1) of plots
    plot_top, plot_bottom = panels[0][0], panels[-1][1]

    def x_of(t: float) -> float:
        return left + (_clamp(t) - t_lo) / (t_hi - t_lo) * pw

    # legend, for what the run actually has
    spans = _postcopy_spans(samples)
    pass_changes = [(s.t, s.pass_no) for prev, s in zip(samples, samples[1:]) if s.pass_no != prev.pass_no]
    legend: list[tuple[str, str]] = []
    if decisions:
        legend.append(("decision", "kvmshell decision"))
    if pass_changes:
        legend.append(("pass", "pass change"))
    if spans:
        legend.append(("postcopy", "postcopy"))
    lx = width - right
    if lx - sum(5.6 * len(label) + 30 for _, label in legend) < 12:      # no room: leave it out
        legend = []
    for kind, label in reversed(legend):
        lx -= 5.6 * len(label) + 30
        sw = {"decision": f'stroke="{DECISION_COLOR}" stroke-dasharray="4 3"',
              "pass": f'stroke="{PASS_COLOR}" stroke-dasharray="2 3"'}.get(kind)
        if sw:
            out.append(f'<line x1="{_c(lx)}" y1="36" x2="{_c(lx + 18)}" y2="36" {sw} stroke-width="1.5"/>')
        else:
            out.append(f'<rect x="{_c(lx)}" y="31" width="18" height="10" fill="{POSTCOPY_COLOR}" '
                       f'fill-opacity="0.18"/>')
        out.append(f'<text x="{_c(lx + 22)}" y="40" font-size="10" fill="#4a5568">{label}</text>')

    for series, (y0, y1) in zip(SERIES, panels):
        values = [_clamp(series.value(s)) for s in samples]
        n_ticks = min(3, max(1, int((y1 - y0) // 28)))          # no closer than 28 px
        v_lo, v_hi, y_ticks, y_step = _axis(min(0.0, *values), max(0.0, *values), n_ticks, extend=True)

        def y_of(v: float, y0: float = y0, y1: float = y1, v_lo: float = v_lo, v_hi: float = v_hi) -> float:
            return y1 - (v - v_lo) / (v_hi - v_lo) * (y1 - y0)

        out.append(f'<g class="panel" data-series="{series.key}">')
        out.append(f'<text class="panel-title" x="{left}" y="{_c(y0 - 6)}" font-weight="bold" '
                   f'fill="#2d3748">{series.title}</text>')
        for a, b in spans:
            xa, xb = x_of(a), x_of(b)
            out.append(f'<rect class="postcopy" x="{_c(xa)}" y="{_c(y0)}" width="{_c(max(xb - xa, 2.0))}" '
                       f'height="{_c(y1 - y0)}" fill="{POSTCOPY_COLOR}" fill-opacity="0.12"/>')
        for v in y_ticks:
            y = y_of(v)
            out.append(f'<line x1="{left}" y1="{_c(y)}" x2="{left + pw}" y2="{_c(y)}" stroke="#edf2f7"/>')
            out.append(f'<text x="{left - 5}" y="{_c(y + 4)}" text-anchor="end" font-size="10" '
                       f'fill="#4a5568">{_tick_label(v, y_step)}</text>')
        for t in x_ticks:
            out.append(f'<line x1="{_c(x_of(t))}" y1="{_c(y0)}" x2="{_c(x_of(t))}" y2="{_c(y1)}" '
                       f'stroke="#f4f6f8"/>')
        out.append(f'<rect x="{left}" y="{_c(y0)}" width="{pw}" height="{_c(y1 - y0)}" fill="none" '
                   f'stroke="#a0aec0"/>')
        pts = _thin([(x_of(_num(s.t)), y_of(v)) for s, v in zip(samples, values)])
        out.append(f'<polyline class="series" data-series="{series.key}" fill="none" stroke="{series.color}" '
                   f'stroke-width="1.6" stroke-linejoin="round" points="'
                   + " ".join(f"{_c(x)},{_c(y)}" for x, y in pts) + '"/>')
        if len(pts) == 1:
            out.append(f'<circle cx="{_c(pts[0][0])}" cy="{_c(pts[0][1])}" r="2.5" fill="{series.color}"/>')
        out.append("</g>")

    for t in x_ticks:
        out.append(f'<text x="{_c(x_of(t))}" y="{_c(plot_bottom + 14)}" text-anchor="middle" font-size="10" '
                   f'fill="#4a5568">{_tick_label(t, x_step)}</text>')
    out.append(f'<text x="{left + pw}" y="{_c(plot_bottom + 30)}" text-anchor="end" font-size="10" '
               f'fill="#4a5568">time (s)</text>')

    def marker(x: float) -> str:          # a vertical line through each panel, not across the titles
        return " ".join(f"M{_c(x)},{_c(y0)}V{_c(y1)}" for y0, y1 in panels)

    for t, pass_no in pass_changes:
        out.append(f'<path class="pass" d="{marker(x_of(_num(t)))}" fill="none" stroke="{PASS_COLOR}" '
                   f'stroke-dasharray="2 3"><title>pass {_esc(pass_no)}</title></path>')
    label_rows = min(3, max(1, int((panels[0][1] - panels[0][0]) // 11)))
    for i, ev in enumerate(decisions):
        x = x_of(_num(ev.t))
        out.append(f'<path class="decision" d="{marker(x)}" fill="none" stroke="{DECISION_COLOR}" '
                   f'stroke-dasharray="4 3"><title>{_esc(decision_line(ev), 300)}</title></path>')
        anchor = "end" if x > left + pw * 0.8 else "start"
        lx = x - 3 if anchor == "end" else x + 3
        out.append(f'<text class="decision-label" x="{_c(lx)}" y="{_c(plot_top + 11 + (i % label_rows) * 11)}" '
                   f'text-anchor="{anchor}" font-size="9" fill="{DECISION_COLOR}">{_esc(ev.name, 28)}</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"


def write_report(trace: Trace, out_path: str | Path) -> None:
    """Write ``render_svg(trace)`` to ``out_path``, which must end in ``.svg``."""
    path = Path(out_path)
    if path.suffix.lower() != ".svg":
        raise ValueError(f"{path}: only SVG reports are supported; give a .svg path "
                         f"(not {path.suffix or 'a path without a suffix'})")
    path.write_text(render_svg(trace), encoding="utf-8")
