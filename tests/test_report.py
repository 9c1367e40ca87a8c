"""The migration report: figures from a trace, the SVG picture of it, and writing it out.

The traces are built in code: a precopy run that converges in four passes, one that fails (its samples
made by ``Sample.from_info`` from ``query-migrate`` views, as the job makes them), a postcopy run, an
empty one; each is also round-tripped through the JSON-lines format.
"""

from __future__ import annotations

import io
import math
import re
import xml.etree.ElementTree as ET
from dataclasses import replace
from pathlib import Path

import pytest

from kvmshell.core.migration.model.report import (
    UNFINISHED,
    Summary,
    render_svg,
    summarize,
    summary_table,
    write_report,
)
from kvmshell.core.migration.model.samples import (
    Sample,
    Trace,
    TraceEvent,
    TraceHeader,
    TraceWriter,
    load_trace,
    read_trace,
)
from kvmshell.core.values.models import MigrationInfo, MigrationStatus, RamStats

GIB = 1 << 30
MB = 1_000_000
NS = "{http://www.w3.org/2000/svg}"
PANEL_TITLES = ("remaining RAM (MiB)", "dirty rate (MB/s)", "throughput (MB/s)")


def sample(t: float, status: str, pass_no: int, transferred: int, remaining: int, total: int, *,
           dirty: int = 0, throughput: float = 0.0, throttle: int = 0, postcopy_requests: int = 0,
           downtime_ms: int | None = None, total_time_ms: int | None = None) -> Sample:
    return Sample(t=t, status=status, pass_no=pass_no, transferred=transferred, remaining=remaining,
                  total=total, dirty_pages_rate=dirty // 4096, dirty_bytes_rate=dirty,
                  mbps=throughput * 8 / MB, throughput=throughput, expected_downtime_ms=None,
                  cpu_throttle=throttle, postcopy_requests=postcopy_requests,
                  downtime_ms=downtime_ms, total_time_ms=total_time_ms)


def header(guest: str, ram: int) -> TraceHeader:
    return TraceHeader(guest=guest, started=1_767_000_000.0, ram_bytes=ram,
                       params={"max-bandwidth": 400 * MB, "downtime-limit": 300},
                       capabilities={"postcopy-ram": True}, strategy="auto", link_bytes_per_s=400e6)


def precopy_run() -> Trace:
    """1 GiB at 400 MB/s: pass 1 sends it all, passes 2-4 the pages dirtied meanwhile; kvmshell throttles."""
    total = GIB
    samples = (
        sample(0.0, "setup", 0, 0, 0, total),
        sample(0.5, "active", 1, 200 * MB, total - 200 * MB, total, throughput=400e6),
        sample(1.0, "active", 1, 400 * MB, total - 400 * MB, total, throughput=400e6),
        sample(1.5, "active", 1, 600 * MB, total - 600 * MB, total, throughput=400e6),
        sample(2.0, "active", 1, 800 * MB, total - 800 * MB, total, throughput=400e6),
        sample(2.5, "active", 1, 1000 * MB, total - 1000 * MB, total, throughput=400e6),
        sample(3.0, "active", 2, 1150 * MB, 60 * MB, total, dirty=120 * MB, throughput=300e6),
        sample(3.5, "active", 3, 1300 * MB, 30 * MB, total, dirty=110 * MB, throughput=300e6, throttle=20),
        sample(4.0, "active", 4, 1400 * MB, 8 * MB, total, dirty=60 * MB, throughput=200e6, throttle=30),
        sample(4.2, "completed", 4, 1420 * MB, 0, total, throughput=100e6, downtime_ms=45,
               total_time_ms=4180),
    )
    events = (
        TraceEvent(0.0, "qemu", "MIGRATION", {"status": "setup"}),
        TraceEvent(0.1, "qemu", "MIGRATION", {"status": "active"}),
        TraceEvent(2.9, "qemu", "MIGRATION_PASS", {"pass": 2}),
        TraceEvent(3.3, "kvmshell", "cpu-throttle", {"reason": "dirty rate 120 MB/s is 30% of the link",
                                                     "percent": 20}),
        TraceEvent(3.4, "qemu", "MIGRATION_PASS", {"pass": 3}),
        TraceEvent(3.8, "kvmshell", "raise-throttle", {"percent": 30}),
        TraceEvent(3.9, "qemu", "MIGRATION_PASS", {"pass": 4}),
        TraceEvent(4.15, "qemu", "STOP"),
        TraceEvent(4.18, "qemu", "MIGRATION", {"status": "completed"}),
    )
    return Trace(header("web-1", GIB), samples, events)


def failed_run() -> Trace:
    """4 GiB, the destination goes away during pass 1: QEMU's failed reply has no ram section."""
    total = 4 * GIB
    infos = [
        (0.25, MigrationInfo(MigrationStatus.SETUP, total_time_ms=250)),
        (1.0, MigrationInfo(MigrationStatus.ACTIVE, RamStats(transferred=90 * MB, remaining=total - 90 * MB,
                                                             total=total, dirty_sync_count=1, mbps=720.0),
                            total_time_ms=1000, expected_downtime_ms=300)),
        (2.0, MigrationInfo(MigrationStatus.ACTIVE, RamStats(transferred=190 * MB, remaining=total - 190 * MB,
                                                             total=total, dirty_sync_count=1, mbps=800.0),
                            total_time_ms=2000, expected_downtime_ms=300)),
        (3.0, MigrationInfo(MigrationStatus.ACTIVE, RamStats(transferred=280 * MB, remaining=total - 280 * MB,
                                                             total=total, dirty_sync_count=1, mbps=720.0),
                            total_time_ms=3000, expected_downtime_ms=300)),
        (3.4, MigrationInfo(MigrationStatus.FAILED, error="Unable to write to socket: Broken pipe")),
    ]
    samples: list[Sample] = []
    for t, info in infos:
        samples.append(Sample.from_info(info, t, samples[-1] if samples else None))
    events = (
        TraceEvent(0.0, "qemu", "MIGRATION", {"status": "setup"}),
        TraceEvent(0.3, "qemu", "MIGRATION", {"status": "active"}),
        TraceEvent(3.35, "qemu", "MIGRATION", {"status": "failed"}),
        TraceEvent(3.4, "kvmshell", "give-up", {"reason": "QEMU says failed: Unable to write to socket"}),
    )
    return Trace(header("db-2", total), tuple(samples), events)


def postcopy_run() -> Trace:
    """8 GiB that dirties faster than the link: two precopy passes, then kvmshell switches to postcopy."""
    total = 8 * GIB
    samples = (
        sample(0.0, "setup", 0, 0, 0, total),
        sample(1.0, "active", 1, 1000 * MB, total - 1000 * MB, total, throughput=1000e6),
        sample(2.0, "active", 1, 2000 * MB, total - 2000 * MB, total, throughput=1000e6),
        sample(3.0, "active", 2, 3000 * MB, 6000 * MB, total, dirty=900 * MB, throughput=1000e6),
        sample(4.0, "active", 2, 4000 * MB, 5500 * MB, total, dirty=950 * MB, throughput=1000e6),
        sample(5.0, "active", 3, 5000 * MB, 5200 * MB, total, dirty=980 * MB, throughput=1000e6),
        sample(5.5, "postcopy-active", 3, 5600 * MB, 4600 * MB, total, throughput=1200e6, postcopy_requests=40),
        sample(6.0, "postcopy-active", 3, 6900 * MB, 3300 * MB, total, throughput=2600e6, postcopy_requests=95),
        sample(6.5, "postcopy-active", 3, 8100 * MB, 2100 * MB, total, throughput=2400e6, postcopy_requests=130),
        sample(7.0, "postcopy-active", 3, 9300 * MB, 900 * MB, total, throughput=2400e6, postcopy_requests=150),
        sample(7.5, "completed", 3, 10200 * MB, 0, total, throughput=1800e6, postcopy_requests=151,
               downtime_ms=120, total_time_ms=7450),
    )
    events = (
        TraceEvent(3.0, "kvmshell", "not-converging", {"reason": "dirty rate 900 MB/s vs 1000 MB/s link"}),
        TraceEvent(5.1, "kvmshell", "switch-to-postcopy", {"reason": "3 passes & still 5 GB left"}),
        TraceEvent(5.4, "qemu", "MIGRATION", {"status": "postcopy-active"}),
        TraceEvent(7.45, "qemu", "MIGRATION", {"status": "completed"}),
    )
    return Trace(header("big-3", total), samples, events)


def empty_run() -> Trace:
    return Trace(header("idle-4", 2 * GIB), (), ())


RUNS = {"precopy": precopy_run, "failed": failed_run, "postcopy": postcopy_run, "empty": empty_run}


def round_trip(trace: Trace) -> str:
    buf = io.StringIO()
    w = TraceWriter(buf)
    w.write(trace.header)
    for item in sorted([*trace.samples, *trace.events], key=lambda x: x.t):
        w.write(item)
    return buf.getvalue()


# --- the trace format ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", RUNS)
def test_runs_survive_the_trace_format(name: str) -> None:
    trace = RUNS[name]()
    text = round_trip(trace)
    assert text.splitlines()[0].startswith('{"capabilities"')      # the header line first
    back = read_trace(text.splitlines(keepends=True), name)
    assert back == trace
    assert summarize(back) == summarize(trace)
    assert render_svg(back) == render_svg(trace)


def test_load_trace_then_report(tmp_path: Path) -> None:
    src = tmp_path / "web-1.trace"
    src.write_text(round_trip(precopy_run()), encoding="utf-8")
    out = tmp_path / "web-1.svg"
    write_report(load_trace(src), out)
    assert ET.parse(out).getroot().tag == f"{NS}svg"


# --- summarize ---------------------------------------------------------------------------------------


def test_summary_of_a_precopy_run() -> None:
    assert summarize(precopy_run()) == Summary(
        guest="web-1", outcome="completed", total_s=4.18, downtime_ms=45, bytes_sent=1_420_000_000,
        passes=4, ram_bytes=GIB, peak_dirty_bytes_rate=120_000_000, mean_throughput=1_420_000_000 / 4.18,
        peak_throughput=400e6, postcopy=False, max_cpu_throttle=30,
        decisions=("t=3.3s cpu-throttle: dirty rate 120 MB/s is 30% of the link",
                   "t=3.8s raise-throttle: percent=30"),
    )


def test_summary_of_a_failed_run() -> None:
    s = summarize(failed_run())
    assert s == Summary(
        guest="db-2", outcome="failed", total_s=3.4, downtime_ms=None, bytes_sent=280 * MB, passes=1,
        ram_bytes=4 * GIB, peak_dirty_bytes_rate=0, mean_throughput=280 * MB / 3.4,
        peak_throughput=90 * MB / 0.75, postcopy=False, max_cpu_throttle=0,
        decisions=("t=3.4s give-up: QEMU says failed: Unable to write to socket",),
    )


def test_summary_of_a_postcopy_run() -> None:
    s = summarize(postcopy_run())
    assert s.outcome == "completed"
    assert (s.total_s, s.downtime_ms, s.bytes_sent, s.passes) == (7.45, 120, 10_200_000_000, 3)
    assert s.postcopy is True
    assert s.peak_throughput == 2600e6
    assert s.peak_dirty_bytes_rate == 980_000_000
    assert s.mean_throughput == 10_200_000_000 / 7.45
    assert s.decisions == ("t=3.0s not-converging: dirty rate 900 MB/s vs 1000 MB/s link",
                           "t=5.1s switch-to-postcopy: 3 passes & still 5 GB left")


def test_summary_of_an_empty_run() -> None:
    assert summarize(empty_run()) == Summary(
        guest="idle-4", outcome=UNFINISHED, total_s=None, downtime_ms=None, bytes_sent=0, passes=0,
        ram_bytes=2 * GIB, peak_dirty_bytes_rate=0, mean_throughput=0.0, peak_throughput=0.0,
        postcopy=False, max_cpu_throttle=0, decisions=(),
    )


def test_a_trace_cut_short_is_unfinished_and_timed_by_its_last_sample() -> None:
    run = precopy_run()
    cut = replace(run, samples=run.samples[:7], events=run.events[:3])
    s = summarize(cut)
    assert (s.outcome, s.total_s, s.downtime_ms, s.passes, s.bytes_sent) == (UNFINISHED, 3.0, None, 2, 1150 * MB)
    assert s.mean_throughput == 1150 * MB / 3.0


def test_a_migration_event_after_the_last_sample_settles_the_outcome() -> None:
    run = precopy_run()
    cut = replace(run, samples=run.samples[:-1], events=(*run.events, TraceEvent(4.3, "qemu", "MIGRATION",
                                                                                  {"status": "cancelled"})))
    assert summarize(cut).outcome == "cancelled"
    # an older event does not override a later sample
    stale = replace(run, samples=run.samples[:-1], events=(TraceEvent(1.0, "qemu", "MIGRATION",
                                                                      {"status": "failed"}),))
    assert summarize(stale).outcome == UNFINISHED


def test_ram_comes_from_the_samples_when_the_header_has_none() -> None:
    run = precopy_run()
    assert summarize(replace(run, header=replace(run.header, ram_bytes=0))).ram_bytes == GIB


def test_summary_table_rows() -> None:
    rows = summary_table(summarize(precopy_run()))
    assert rows == [
        ("guest", "web-1"),
        ("outcome", "completed"),
        ("total time", "4.18 s"),
        ("downtime", "45 ms"),
        ("guest RAM", "1.00 GiB"),
        ("sent", "1.32 GiB"),
        ("passes", "4"),
        ("mean throughput", "339.7 MB/s"),
        ("peak throughput", "400.0 MB/s"),
        ("peak dirty rate", "120.0 MB/s"),
        ("postcopy", "no"),
        ("max CPU throttle", "30%"),
        ("decision", "t=3.3s cpu-throttle: dirty rate 120 MB/s is 30% of the link"),
        ("decision", "t=3.8s raise-throttle: percent=30"),
    ]
    empty = dict(summary_table(summarize(empty_run())))
    assert empty["total time"] == "-" and empty["downtime"] == "-" and empty["sent"] == "0.0 MiB"
    assert empty["max CPU throttle"] == "off" and empty["outcome"] == UNFINISHED
    assert dict(summary_table(summarize(failed_run())))["sent"] == "267.0 MiB"


# --- the SVG -------------------------------------------------------------------------------------------


NUMERIC_ATTRS = ("x", "y", "x1", "y1", "x2", "y2", "width", "height", "cx", "cy", "r")


def parse(svg: str) -> ET.Element:
    root = ET.fromstring(svg)
    assert root.tag == f"{NS}svg"
    for el in root.iter():
        for a in NUMERIC_ATTRS:
            if a in el.attrib:
                assert math.isfinite(float(el.attrib[a])), (el.tag, a, el.attrib[a])
        if "d" in el.attrib:
            for n in re.findall(r"[-+0-9.eE]+|[a-zA-Z]+", el.attrib["d"]):
                assert n in "MVHLZ" or math.isfinite(float(n)), el.attrib["d"]
    for pts in series_points(root).values():
        for x, y in pts:
            assert math.isfinite(x) and math.isfinite(y)
    return root


def series_points(root: ET.Element) -> dict[str, list[tuple[float, float]]]:
    out = {}
    for el in root.iter(f"{NS}polyline"):
        if el.get("class") == "series":
            assert el.get("data-series") not in out
            out[el.get("data-series")] = [tuple(map(float, p.split(","))) for p in el.get("points").split()]
    return out


def texts(root: ET.Element, cls: str | None = None) -> list[str]:
    return [el.text or "" for el in root.iter(f"{NS}text") if cls is None or el.get("class") == cls]


def by_class(root: ET.Element, tag: str, cls: str) -> list[ET.Element]:
    return [el for el in root.iter(f"{NS}{tag}") if el.get("class") == cls]


def marker_xs(root: ET.Element, cls: str) -> list[float]:
    """The x of each vertical marker: a path of one "Mx,yVy" segment per panel."""
    xs = []
    for el in by_class(root, "path", cls):
        segments = re.fullmatch(r"(M[-0-9.]+,[-0-9.]+V[-0-9.]+ ?){3}", el.get("d"))
        assert segments, el.get("d")
        found = {float(x) for x in re.findall(r"M([-0-9.]+),", el.get("d"))}
        assert len(found) == 1
        xs.append(found.pop())
    return xs


@pytest.mark.parametrize("name", ["precopy", "failed", "postcopy"])
def test_svg_has_three_panels_with_one_line_per_series(name: str) -> None:
    trace = RUNS[name]()
    root = parse(render_svg(trace))
    assert texts(root, "panel-title") == list(PANEL_TITLES)
    pts = series_points(root)
    assert sorted(pts) == ["dirty", "remaining", "throughput"]
    assert all(len(p) == len(trace.samples) for p in pts.values())
    # time runs left to right, in step across the panels
    xs = [x for x, _ in pts["remaining"]]
    assert xs == sorted(xs) and xs == [x for x, _ in pts["throughput"]] == [x for x, _ in pts["dirty"]]


def test_svg_title_and_markers_of_a_precopy_run() -> None:
    svg = render_svg(precopy_run())
    root = parse(svg)
    assert texts(root, "title") == ["web-1 \u00b7 completed \u00b7 total 4.18 s \u00b7 downtime 45 ms"]
    assert texts(root, "decision-label") == ["cpu-throttle", "raise-throttle"]
    assert len(marker_xs(root, "decision")) == 2
    # passes 0 (setup) -> 1 -> 2 -> 3 -> 4
    assert [el.find(f"{NS}title").text for el in by_class(root, "path", "pass")] == [
        "pass 1", "pass 2", "pass 3", "pass 4"]
    assert by_class(root, "rect", "postcopy") == []
    assert len(svg) < 20_000


def test_markers_sit_at_their_times() -> None:
    root = parse(render_svg(precopy_run()))
    pts = series_points(root)["remaining"]
    t_of_x = {round(x, 1): t for (x, _), t in zip(pts, [s.t for s in precopy_run().samples])}
    pass_x = marker_xs(root, "pass")
    assert [t_of_x[x] for x in pass_x] == [0.5, 3.0, 3.5, 4.0]
    d = marker_xs(root, "decision")
    # decisions at 3.3 s and 3.8 s fall between the samples at 3.0/3.5 and 3.5/4.0
    x30, x35, x40 = (pts[i][0] for i in (6, 7, 8))
    assert x30 < d[0] < x35 < d[1] < x40
    assert d[0] == pytest.approx(x30 + (x35 - x30) * 0.6, abs=0.11)


def test_postcopy_is_shaded_in_every_panel() -> None:
    root = parse(render_svg(postcopy_run()))
    bands = by_class(root, "rect", "postcopy")
    assert len(bands) == 3
    pts = series_points(root)["remaining"]
    x_start, x_end = pts[6][0], pts[10][0]        # first postcopy sample .. the completed one
    for band in bands:
        assert float(band.get("x")) == pytest.approx(x_start, abs=0.11)
        assert float(band.get("x")) + float(band.get("width")) == pytest.approx(x_end, abs=0.21)
    assert texts(root, "decision-label") == ["not-converging", "switch-to-postcopy"]
    assert "postcopy" in texts(root)              # the legend


def test_failed_run_title() -> None:
    root = parse(render_svg(failed_run()))
    assert texts(root, "title") == ["db-2 \u00b7 failed \u00b7 total 3.40 s \u00b7 downtime -"]
    assert texts(root, "decision-label") == ["give-up"]


def test_no_samples() -> None:
    root = parse(render_svg(empty_run()))
    assert texts(root, "empty") == ["no samples"]
    assert series_points(root) == {}
    assert texts(root, "panel-title") == []


def test_a_single_sample() -> None:
    s = sample(0.0, "setup", 0, 0, 0, GIB)
    root = parse(render_svg(Trace(header("one", GIB), (s,), ())))
    pts = series_points(root)
    assert [len(p) for p in pts.values()] == [1, 1, 1]
    assert len(list(root.iter(f"{NS}circle"))) == 3        # a lone point still shows
    later = sample(2.5, "active", 1, 10 * MB, GIB - 10 * MB, GIB, throughput=4e6)
    pts = series_points(parse(render_svg(Trace(header("one", GIB), (later,), ()))))
    assert [len(p) for p in pts.values()] == [1, 1, 1]


def test_all_zero_series() -> None:
    samples = tuple(sample(t, "setup", 0, 0, 0, 0) for t in (0.0, 0.0, 0.0))
    root = parse(render_svg(Trace(header("zero", 0), samples, ())))
    for p in series_points(root).values():
        assert len(p) == 3 and len({y for _, y in p}) == 1


def test_tiny_values_and_times() -> None:
    samples = (sample(0.0, "active", 1, 0, 0, 0, throughput=5e-324),
               sample(5e-324, "active", 1, 0, 0, 0, throughput=1e-300))
    root = parse(render_svg(Trace(header("tiny", 0), samples, ())))
    assert all(len(p) == 2 for p in series_points(root).values())


def test_huge_values() -> None:
    big = 10**30
    samples = (sample(0.0, "active", 1, 0, big, big, dirty=big, throughput=1e300),
               sample(1e9, "active", 2, big, big // 2, big, dirty=big * 3, throughput=3e300),
               sample(2e9, "completed", 10**6, 2 * big, 0, big, total_time_ms=2 * 10**12, downtime_ms=10**9))
    trace = Trace(header("huge", big), samples, (TraceEvent(1.5e9, "kvmshell", "x" * 200, {}),))
    root = parse(render_svg(trace))
    assert all(len(p) == 3 for p in series_points(root).values())
    assert texts(root, "decision-label") == ["x" * 27 + "\u2026"]
    s = summarize(trace)
    assert s.bytes_sent == 2 * big and s.total_s == 2e9 and s.peak_dirty_bytes_rate == 3 * big
    table = dict(summary_table(s))
    assert table["sent"] == "1.86e+21 GiB" and table["peak throughput"] == "3e+294 MB/s"
    assert table["total time"] == "2e+09 s" and table["passes"] == "1000000"


def test_non_numbers_in_a_trace_do_not_reach_the_picture() -> None:
    """json.loads takes NaN and Infinity, and read_trace does not check types."""
    text = round_trip(precopy_run())
    text = text.replace('"throughput": 300000000.0', '"throughput": NaN', 1)
    text = text.replace('"throughput": 200000000.0', '"throughput": Infinity', 1)
    text = text.replace('"dirty_bytes_rate": 60000000', '"dirty_bytes_rate": "lots"', 1)
    text = text.replace('"t": 0.5,', '"t": NaN,', 1)
    trace = read_trace(text.splitlines(), "bad")
    assert any(isinstance(s.dirty_bytes_rate, str) for s in trace.samples)
    svg = render_svg(trace)
    assert not re.search(r"nan|inf", svg, re.IGNORECASE)
    root = parse(svg)
    # the sample whose time is NaN is left out of the picture
    assert all(len(p) == len(trace.samples) - 1 for p in series_points(root).values())
    s = summarize(trace)
    assert math.isfinite(s.peak_throughput) and s.peak_throughput == 400e6
    assert s.peak_dirty_bytes_rate == 120 * MB


def test_text_is_escaped() -> None:
    nasty = 'a<b>&"c\' \x00\x1b\ud800\ufffe'
    trace = precopy_run()
    trace = replace(trace, header=replace(trace.header, guest=nasty),
                    events=(TraceEvent(1.0, "kvmshell", "</text><script>alert(1)</script>",
                                       {"reason": "x & y < z"}),))
    svg = render_svg(trace)
    svg.encode("utf-8")                                    # no lone surrogate left
    root = parse(svg)
    assert "<script>" not in svg and not list(root.iter(f"{NS}script"))
    title = texts(root, "title")[0]
    assert title.startswith('a<b>&"c\' \ufffd\ufffd\ufffd\ufffd \u00b7 completed')
    assert texts(root, "decision-label") == ["</text><script>alert(1)</sc\u2026"]
    line = by_class(root, "path", "decision")[0]
    assert line.find(f"{NS}title").text == "t=1.0s </text><script>alert(1)</script>: x & y < z"


def test_a_long_guest_name_is_cut_to_the_width() -> None:
    trace = precopy_run()
    trace = replace(trace, header=replace(trace.header, guest="g" * 500))
    title = texts(parse(render_svg(trace, width=400, height=300)), "title")[0]
    assert len(title) <= (400 - 24) / 8 and title.endswith("\u2026")


def test_smallest_picture_keeps_everything_inside() -> None:
    for trace in (precopy_run(), postcopy_run()):
        root = parse(render_svg(trace, width=300, height=240))
        for el in root.iter():
            for a in ("x", "x1", "x2", "cx"):
                if a in el.attrib:
                    assert 0 <= float(el.attrib[a]) <= 300, (el.tag, el.attrib)
            for a in ("y", "y1", "y2", "cy"):
                if a in el.attrib:
                    assert 0 <= float(el.attrib[a]) <= 240, (el.tag, el.attrib)
        assert texts(root, "panel-title") == list(PANEL_TITLES)


def test_size_is_what_was_asked() -> None:
    root = parse(render_svg(postcopy_run(), width=1200, height=700))
    assert (root.get("width"), root.get("height"), root.get("viewBox")) == ("1200", "700", "0 0 1200 700")
    with pytest.raises(ValueError, match="too small"):
        render_svg(postcopy_run(), width=100, height=50)


def test_many_samples_are_thinned_per_pixel_but_keep_their_extremes() -> None:
    total = GIB
    samples = tuple(sample(i * 0.01, "active", 1, i * MB, total - i * MB, total,
                           dirty=(5000 if i == 4321 else 1) * MB, throughput=100e6) for i in range(20_000))
    svg = render_svg(Trace(header("long", total), samples, ()))
    root = parse(svg)
    pts = series_points(root)
    assert all(len(p) <= 4 * 900 for p in pts.values())
    assert min(y for _, y in pts["dirty"]) < min(y for _, y in pts["throughput"])   # the spike survives
    assert len(svg) < 400_000


# --- write_report --------------------------------------------------------------------------------------


def test_write_report_writes_svg(tmp_path: Path) -> None:
    out = tmp_path / "run.SVG"
    write_report(postcopy_run(), out)
    assert out.read_text(encoding="utf-8") == render_svg(postcopy_run())
    write_report(empty_run(), str(tmp_path / "empty.svg"))
    assert "no samples" in (tmp_path / "empty.svg").read_text(encoding="utf-8")


@pytest.mark.parametrize("name", ["run.png", "run.pdf", "run"])
def test_write_report_refuses_other_formats(tmp_path: Path, name: str) -> None:
    with pytest.raises(ValueError, match="only SVG"):
        write_report(precopy_run(), tmp_path / name)
    assert not (tmp_path / name).exists()
