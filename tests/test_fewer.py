"""Sending fewer bytes: the pure model of bytes on the wire per option (model/wire.py), and each
option end to end with real QEMU guests (the pair of tests/test_live.py: a QMP source and an HMP
destination): the migration completes, the memory is intact on the destination, both sides'
settings are as before after a success and after a cancel, an option the guest lacks is refused."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from kvmshell.core.migration.live.job import MigrationJob
from kvmshell.core.migration.live.request import MigrationRequest
from kvmshell.core.migration.live.strategies.auto import Auto
from kvmshell.core.migration.live.wiredata import check_supported, wire_data
from kvmshell.core.migration.model.choice import cheapest
from kvmshell.core.migration.model.wire import (
    PLAIN, XBZRLE_HEADER, Guest, Headroom, WireData, WireOption, cache_size, compress, cost, delta_share,
    idle_cores, multifd, options, xbzrle, xbzrle_size,
)
from kvmshell.errors import CommandFailed
from kvmshell.lab.launcher import Lab, MonitorKind
from kvmshell.lab.verify import check_guest_memory
from tests import test_live
from tests.guests import attached
from tests.test_live import WS, Pair
from tests.test_restore import settings

pair = test_live.pair
MIB = 1 << 20
HOT = Guest(ram=512 * MIB, dirty_rate=1e9, working_set=100e6, link=125e6, downtime_limit_s=0.3)
TEXTY = WireData(pages=512, zero_fraction=0.8, zstd_ratio=0.05, zlib_ratio=0.07, zstd_speed=800e6,
                 zlib_speed=150e6, changed=100, delta_fraction=2 / 4096, interval_s=1.0)
RANDOM = replace(TEXTY, zstd_ratio=1.0, zlib_ratio=1.0, delta_fraction=0.9)
IDLE = Headroom(1.0, 2, 1.0, 2)


# -- the pure model ------------------------------------------------------------------------------

def test_compressible_pages_converge_compressed_where_plain_never_does() -> None:
    costs = {c.option.strategy + str(c.option.parameters.get("multifd-compression", "")): c
             for c in (cost(o, HOT, TEXTY, IDLE) for o in options(HOT))}
    assert not costs["precopy"].converges and not costs["multifdnone"].converges
    z = costs["compresszstd"]
    assert z.converges and z.prediction.downtime_ms is not None and z.prediction.downtime_ms <= 300
    assert z.wire_bytes is not None and z.prediction.bytes_total is not None
    assert z.wire_bytes == pytest.approx(0.05 * z.prediction.bytes_total)
    assert z.cpu_s is not None and z.cpu_s > 0
    chosen = cheapest(list(costs.values()), 0.3)
    assert chosen is not None and chosen.option.parameters["multifd-compression"] == "zstd"


def test_incompressible_pages_gain_nothing_and_auto_stays_plain() -> None:
    cold = replace(HOT, dirty_rate=5e6, working_set=5e6)
    costs = [cost(o, cold, RANDOM, IDLE) for o in options(cold)]
    chosen = cheapest(costs, 0.3)
    assert chosen is not None and chosen.option == PLAIN          # the same time, no CPU spent
    z = next(c for c in costs if c.option.parameters.get("multifd-compression") == "zstd")
    assert z.converges and (z.prediction.total_s or 0) >= (chosen.prediction.total_s or 0) * 0.99


def test_re_sent_pages_are_costed_at_their_own_compression() -> None:
    """A guest whose resident pages compress well but whose working set is rewritten with random bytes
    (bench s14's Linux guest: its page cache, and its incompressible load): the first pass gains from
    compression, the re-sends do not, and cost their whole size on the wire."""
    g = Guest(ram=2048 * MIB, dirty_rate=101e6, working_set=536e6, link=125e6, downtime_limit_s=0.3)
    mixed = replace(RANDOM, zero_fraction=0.68, zstd_ratio=0.84, zlib_ratio=0.84, zstd_speed=415e6,
                    changed_zstd_ratio=1.0, changed_zlib_ratio=1.0)
    room = Headroom(0.9, 2, 0.9, 2)
    plain, z = cost(PLAIN, g, mixed, room), cost(compress("zstd", 1), g, mixed, room)
    assert z.rate == pytest.approx(125e6) and z.limit == "the link"         # the re-sends' rate
    first = 2048 * MIB * 0.32
    assert z.prediction.bytes_total is not None and z.wire_bytes is not None
    assert z.wire_bytes == pytest.approx(first * 0.84 + z.prediction.bytes_total - first)
    assert z.prediction.total_s is not None and plain.prediction.total_s is not None
    assert z.prediction.total_s < plain.prediction.total_s                # a shorter first pass, fewer re-dirtied
    alike = replace(mixed, changed_zstd_ratio=None, changed_zlib_ratio=None)     # not measured: one ratio
    one = cost(compress("zstd", 1), g, alike, room)
    assert one.rate == pytest.approx(125e6 / 0.84) and one.wire_bytes == pytest.approx(0.84 * (one.prediction.bytes_total or 0))
    assert (one.prediction.total_s or 0) < 0.8 * z.prediction.total_s


def test_compression_is_bounded_by_the_idle_cores() -> None:
    busy = Headroom(0.0, 2, 2.0, 2)
    c = cost(compress("zstd", 1), HOT, TEXTY, busy)
    assert c.rate == pytest.approx(800e6 * 0.5) and c.limit == "compressing on the source"
    assert cost(compress("zstd", 1), HOT, TEXTY, IDLE).rate == pytest.approx(800e6)


def test_xbzrle_threshold_stays_the_wire_rate() -> None:
    """QEMU measures XBZRLE's bandwidth in encoded bytes: a hot working set larger than the wire rate x
    the limit never converges, however small its deltas; a smaller one does, in few bytes."""
    opt = xbzrle(cache_size(HOT.working_set, HOT.ram))
    assert not cost(opt, HOT, TEXTY, IDLE).converges
    small = replace(HOT, working_set=30e6)
    c = cost(opt, small, TEXTY, IDLE)
    assert c.converges and c.wire_bytes is not None and c.wire_bytes < small.ram


def test_xbzrle_sends_the_runs_that_changed_or_the_whole_page() -> None:
    page = bytes(range(256)) * 16
    assert xbzrle_size(page, page) == 0                                  # unchanged: nothing
    sparse = bytearray(page)
    sparse[100] ^= 1                                                     # 1 byte after 100 unchanged: 1+1+1
    sparse[2000:2004] = bytes(x ^ 0xFF for x in sparse[2000:2004])       # 4 after 1899: 2+1+4
    assert xbzrle_size(page, bytes(sparse)) == 10 + XBZRLE_HEADER
    # every other byte changed: 2048 runs of 1 + its two lengths = 6144 bytes, more than the page: sent as is
    alternate = bytes(x ^ 1 if i % 2 else x for i, x in enumerate(page))
    assert xbzrle_size(page, alternate) == 4096 + XBZRLE_HEADER


def test_xbzrle_costs_what_the_encoding_measured_not_the_bytes_changed() -> None:
    """Random pages rewritten: 4080 of 4096 bytes differ, and QEMU sends them whole (the encoding
    overflows): no faster than plain pre-copy, where the share of bytes changed alone said 0.4 % faster."""
    small = replace(HOT, working_set=30e6)
    opt = xbzrle(cache_size(small.working_set, small.ram))
    plain = cost(PLAIN, small, RANDOM, IDLE)
    measured = cost(opt, small, replace(RANDOM, xbzrle_share=(4096 + XBZRLE_HEADER) / 4096), IDLE)
    assert measured.prediction.total_s is not None and plain.prediction.total_s is not None
    assert measured.prediction.total_s >= plain.prediction.total_s
    sparse = cost(opt, small, replace(RANDOM, xbzrle_share=0.01), IDLE)
    assert sparse.wire_bytes is not None and measured.wire_bytes is not None and sparse.wire_bytes < measured.wire_bytes


def test_cache_size_holds_the_working_set_in_a_power_of_two() -> None:
    assert cache_size(100e6, 512 * MIB) == 128 * MIB
    assert cache_size(None, 512 * MIB) == 64 * MIB
    assert cache_size(900e6, 512 * MIB) == 512 * MIB


def test_no_option_within_the_limit_gives_none() -> None:
    costs = [cost(o, HOT, RANDOM, IDLE) for o in options(HOT)]
    assert cheapest(costs, 0.3) is None


def test_proc_stat_and_deltas() -> None:
    before = "cpu  100 0 100 800 0 0 0 0 0 0"
    after = "cpu  200 0 200 1400 0 0 0 0 0 0"
    assert idle_cores(before, after) == pytest.approx(0.75)
    assert delta_share(b"\0" * 4096, b"\1" + b"\0" * 4095) == pytest.approx(1 / 4096)


def test_auto_picks_only_with_the_preflight_and_a_known_link() -> None:
    costs = [cost(o, HOT, TEXTY, IDLE) for o in options(HOT)]
    plain = Auto(MigrationRequest("src", dest="dst", allow_postcopy=True))
    assert not plain.wants_wire_data(plain.request) and plain.wire_option(None, 0.3) == (PLAIN, None)
    blind = Auto(MigrationRequest("src", dest="dst", preflight=True))
    option, why = blind.wire_option(costs, 0.3)
    assert option == PLAIN and why is not None and "link's speed is not known" in why
    auto = Auto(MigrationRequest("src", dest="dst", preflight=True, link=125e6))
    option, why = auto.wire_option(costs, 0.3)
    assert option.parameters.get("multifd-compression") == "zstd" and why is not None
    assert "compress is the fastest within the 300 ms downtime limit" in why and "MB on the wire" in why
    # postcopy allowed: auto keeps its strongest lever, and QEMU 7.2 has no postcopy over multifd
    keeps = Auto(MigrationRequest("src", dest="dst", preflight=True, link=125e6, allow_postcopy=True))
    option, why = keeps.wire_option(costs, 0.3)
    assert not option.capabilities.get("multifd") and why is not None and "compress (" not in why
    assert "left out: --allow-postcopy keeps postcopy" in why and keeps.postcopy()


# -- with real QEMU ------------------------------------------------------------------------------

def _but_events(s: tuple) -> tuple:
    return {k: v for k, v in s[0].items() if k != "events"}, s[1]


@pytest.mark.qemu
@pytest.mark.timeout(120)
@pytest.mark.parametrize("strategy", ["multifd", "compress", "xbzrle"])
async def test_each_option_migrates_intact_and_puts_both_sides_back(pair: Pair, strategy: str,
                                                                     tmp_path: Path) -> None:
    src, dst = pair.session.fleet.monitor("src"), pair.session.fleet.monitor("dst")
    src_before, dst_before = await settings(src), await settings(dst)
    await pair.ok(f"@src migrate --to dst --strategy {strategy} --downtime 500")
    ev = await pair.finished(timeout=90)
    assert ev.data["status"] == "completed", ev.data
    check = await check_guest_memory(dst, WS, tmp_path)
    assert check.ok, check.summary()
    assert await settings(src) == src_before
    assert _but_events(await settings(dst)) == _but_events(dst_before)
    wire = [d for d in pair.job().decisions if " wire: " in d]
    assert wire, pair.job().decisions
    cap = "xbzrle" if strategy == "xbzrle" else "multifd"
    assert cap in wire[0], wire
    assert f"on src {cap} off" in ev.data["message"] or f"{cap} off" in ev.data["message"], ev.data["message"]


@pytest.mark.qemu
@pytest.mark.timeout(120)
@pytest.mark.parametrize("strategy, cap, alike", [
    ("compress", "multifd", ("multifd-compression", "multifd-channels", "multifd-zstd-level")),
    ("multifd", "multifd", ("multifd-compression", "multifd-channels")),
    ("xbzrle", "xbzrle", ("xbzrle-cache-size",)),
])
async def test_a_cancelled_option_puts_the_source_back_and_set_both_sides_alike(pair: Pair, strategy: str, cap: str,
                                                                               alike: tuple[str, ...]) -> None:
    src, dst = pair.session.fleet.monitor("src"), pair.session.fleet.monitor("dst")
    before = await settings(src)
    await pair.ok(f"@src migrate --to dst --strategy {strategy} --bandwidth 2M --stall-timeout 60")
    await pair.until_status("active")
    s_caps, s_params = await settings(src)
    d_caps, d_params = await settings(dst)
    assert s_caps[cap] and d_caps[cap]
    for k in alike:
        assert k not in d_params or s_params[k] == d_params[k], k     # HMP's 7.2 `info` omits some
    if strategy == "compress":
        assert d_params["multifd-compression"] == "zstd" and s_params["multifd-compression"] == "zstd"
    await pair.ok("@src migrate_cancel")
    ev = await pair.finished()
    assert ev.data["status"] == "cancelled", ev.data
    assert await settings(src) == before
    # QEMU 7.2's destination quits after a cancelled incoming migration: its settings go with it
    assert "dst has quit" in ev.data["message"], ev.data["message"]


@pytest.mark.qemu
@pytest.mark.timeout(60)
async def test_an_option_the_guest_lacks_is_refused_in_one_line(pair: Pair) -> None:
    job = MigrationJob.of(pair.session.fleet, MigrationRequest("src", dest="dst", strategy="compress"))
    with pytest.raises(CommandFailed) as e:
        await check_supported(job, WireOption("later", {"mapped-ram": True}))
    assert "lacks the migration capability mapped-ram" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(CommandFailed) as e:
        await check_supported(job, replace(compress("zstd"), parameters={"multifd-compression": "qpl"}))
    assert "has no qpl multifd compression" in str(e.value) and "\n" not in str(e.value)
    await check_supported(job, multifd())          # this QEMU has it: no error


@pytest.mark.qemu
@pytest.mark.timeout(60)
async def test_wire_data_sees_the_working_set_change(pair: Pair) -> None:
    data = await wire_data(pair.session.fleet.monitor("src"), count=64, seed=7)
    assert data.pages == 64 and 0 < data.zero_fraction < 1
    assert 0 < data.zstd_ratio < 1 and data.zstd_speed > 0


@pytest.mark.qemu
@pytest.mark.timeout(60)
@pytest.mark.parametrize("fill, low, high", [("incompressible", 0.95, 1.01), ("compressible", 0.0, 0.1)])
async def test_wire_data_measures_how_the_rewritten_pages_compress(lab: Lab, fill: str, low: float,
                                                                    high: float) -> None:
    src = await lab.start("src", MonitorKind.QMP_UNIX, ws_pages=WS, ram_mib=64, fill=fill)   # unpaced
    async with attached(src) as one:
        data = await wire_data(one.session.fleet.monitor("src"), count=192, seed=3)
    assert data.changed >= 4, data.text()
    assert data.changed_zstd_ratio is not None and low <= data.changed_zstd_ratio <= high, data.text()
    assert data.changed_zlib_ratio is not None and low <= data.changed_zlib_ratio <= high, data.text()
    assert f"the changed pages compress to {100 * data.changed_zstd_ratio:.0f} % (zstd)" in data.text()


@pytest.mark.qemu
@pytest.mark.timeout(90)
async def test_the_estimate_lists_each_option(pair: Pair) -> None:
    text = await pair.ok("@src estimate --to dst --link 1gbit")
    for row in ("multifd", "compress zstd", "compress zlib", "xbzrle", "on the wire", "CPU s"):
        assert row in text, text
    assert "fewer bytes: non-zero pages compress to" in text and "idle cores: source" in text, text
    # auto's one pick among these, pre-copy and postcopy at once (model/choice.py), with every option's numbers
    [auto] = [line for line in text.splitlines() if line.startswith("auto would run: ")]
    assert "the fastest whose predicted stall fits the 300 ms limit [precopy " in auto, auto
    assert "compress zstd " in auto and "xbzrle" in auto, auto


@pytest.mark.qemu
@pytest.mark.timeout(120)
async def test_auto_with_preflight_says_why_in_numbers_and_completes(pair: Pair, tmp_path: Path) -> None:
    src, dst = pair.session.fleet.monitor("src"), pair.session.fleet.monitor("dst")
    before = await settings(src)
    await pair.ok("@src migrate --to dst --strategy auto --preflight --link 1gbit")
    ev = await pair.finished(timeout=90)
    assert ev.data["status"] == "completed", ev.data
    check = await check_guest_memory(dst, WS, tmp_path)
    assert check.ok, check.summary()
    [wire] = [d for d in pair.job().decisions if " wire: " in d]
    # one choice among them (and pre-copy at the range's high end), then each fewer-bytes option's cost in
    # numbers, at the same high end
    assert "the fastest whose predicted stall fits the 300 ms limit [precopy " in wire, wire
    for option in ("multifd ", "compress zstd ", "xbzrle "):
        assert option in wire.split("]; ")[0], wire
    for option in ("multifd (", "compress (", "xbzrle ("):
        assert option in wire.split("]; ")[1] and "MB on the wire" in wire, wire
    assert await settings(src) == before
