"""`migrate --to` and its faults, with real QEMU guests on this host."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from kvmshell.core.migration.live.job import MigrationJob
from kvmshell.core.migration.live.request import MigrationRequest
from kvmshell.core.migration.model.samples import load_trace
from kvmshell.core.values.models import MigrationStatus, RunState
from kvmshell.lab.launcher import Lab, MonitorKind
from kvmshell.lab.verify import check_guest_memory
from tests.guests import Pair, attached
from tests.waiting import free_port, wait_for

pytestmark = pytest.mark.qemu
WS = 4096                      # 16 MiB working set
RAM = 64


@pytest.fixture
async def pair(lab: Lab) -> AsyncIterator[Pair]:
    src = await lab.start("src", MonitorKind.QMP_UNIX, ws_pages=WS, pace=2, ram_mib=RAM)
    dst = await lab.start("dst", MonitorKind.HMP_UNIX, ws_pages=WS, ram_mib=RAM, incoming=True, disk=src.disk)
    async with attached(src, dst) as p:
        yield p


async def test_migrate_to_completes_with_the_memory_intact(pair: Pair, tmp_path: Path) -> None:
    trace = tmp_path / "run.jsonl"
    text = await pair.ok(f"@src migrate --to dst --strategy auto --trace {trace}")
    assert "migrating to dst" in text
    ev = await pair.finished()
    assert ev.data["status"] == "completed", ev.data
    dst = pair.session.fleet.monitor("dst")
    await pair.dst.wait_heartbeats(2)
    assert (await dst.status()).state is RunState.RUNNING
    check = await check_guest_memory(dst, WS, tmp_path)
    assert check.ok, check.summary()
    assert (await pair.session.fleet.monitor("src").status()).state is RunState.POSTMIGRATE
    t = load_trace(trace)
    assert t.header.guest == "src" and t.header.strategy == "auto"
    assert t.samples[-1].status is MigrationStatus.COMPLETED and t.samples[-1].total_time_ms
    assert any(e.source == "kvmshell" and e.name == "start" for e in t.events)
    view = await pair.ok("@src info migrate")
    assert "outcome: completed" in view


async def test_second_migration_refused(pair: Pair) -> None:
    await pair.ok("@src migrate --to dst --bandwidth 2M --stall-timeout 60")
    o = await pair.run("@src migrate --to dst")
    assert not o.ok and "already" in (o.error or "")
    o = await pair.run(f"@src migrate tcp:127.0.0.1:{free_port()}")
    assert not o.ok and "already" in (o.error or "")
    await pair.ok("@src migrate_cancel")
    assert (await pair.finished()).data["status"] == "cancelled"


async def test_destination_killed_reported_within_a_second(pair: Pair, tmp_path: Path) -> None:
    await pair.ok("@src migrate --to dst --bandwidth 2M")
    await pair.until_status("active")
    killed = time.monotonic()
    os.kill(pair.dst.pid, signal.SIGKILL)
    ev = await pair.finished()
    assert time.monotonic() - killed < 1.0
    assert ev.data["status"] == "failed"
    src = pair.session.fleet.monitor("src")
    assert (await src.status()).state is RunState.RUNNING
    check = await check_guest_memory(src, WS, tmp_path)
    assert check.ok, check.summary()


async def test_cancel_mid_migration(pair: Pair, tmp_path: Path) -> None:
    await pair.ok("@src migrate --to dst --bandwidth 2M")
    await pair.until_status("active")
    assert "cancelled" in await pair.ok("@src migrate_cancel")
    ev = await pair.finished()
    assert ev.data["status"] == "cancelled"
    src = pair.session.fleet.monitor("src")
    assert (await src.status()).state is RunState.RUNNING
    assert (await check_guest_memory(src, WS, tmp_path)).ok


async def test_stalled_migration_cancelled_by_the_watchdog(pair: Pair) -> None:
    await pair.ok("@src migrate --to dst --stall-timeout 2 --bandwidth 50M")
    await pair.until_status("active")
    os.kill(pair.dst.pid, signal.SIGSTOP)            # the destination freezes: QEMU would wait forever
    try:
        ev = await pair.finished(timeout=60)
        assert ev.data["status"] == "stalled"
        assert "no progress for 2 s" in ev.data["message"]
        assert any("cancel-stalled" in d for d in pair.job().decisions)
        assert (await pair.session.fleet.monitor("src").status()).state is RunState.RUNNING
    finally:
        os.kill(pair.dst.pid, signal.SIGCONT)


async def test_destination_refuses(pair: Pair) -> None:
    port = free_port()                               # nothing listens there
    o = await pair.run(f"@src migrate --strategy auto tcp:127.0.0.1:{port}")
    assert not o.ok and "Connection refused" in (o.error or "") and "runs on as before" in (o.error or "")
    assert (await pair.session.fleet.monitor("src").status()).state is RunState.RUNNING
    o = await pair.run("@dst migrate --to src")     # the source is no -incoming guest
    assert not o.ok


async def test_source_killed_leaves_destination_waiting(pair: Pair) -> None:
    await pair.ok("@src migrate --to dst --bandwidth 2M")
    await pair.until_status("active")
    await pair.src.kill()
    ev = await pair.finished()
    assert ev.data["status"] == "source-lost"
    # QEMU 7.2's destination quits when the stream breaks mid-way; kvmshell says which happened
    assert "dst is left waiting" in ev.data["message"] or "dst has quit too" in ev.data["message"]
    if not pair.dst.alive:
        assert "dst has quit too" in ev.data["message"]


async def test_postcopy_pause_and_recover(pair: Pair, tmp_path: Path) -> None:
    """Postcopy that breaks is reported as the danger it is; migrate_recover + migrate -r finish it."""
    await pair.ok("@src migrate_set_parameter max-postcopy-bandwidth 2M")     # keep it in postcopy a while
    await pair.ok("@src migrate --to dst --strategy postcopy --bandwidth 4M")
    await pair.until_status("postcopy-active", timeout=60)
    # pause once the destination runs the guest too: a pause while it still loads the device state
    # (the source already says postcopy-active) makes QEMU 7.2's destination quit, not pause
    await wait_for(lambda: pair.session.fleet.monitor("dst").migration(),
                   lambda m: m.status is MigrationStatus.POSTCOPY_ACTIVE, what="destination in postcopy")
    await pair.ok("@src migrate_pause")
    ev = await pair.finished()
    assert ev.data["status"] == "postcopy-paused", ev.data
    assert "DANGER" in ev.data["message"] and "migrate_recover" in ev.data["message"]
    await wait_for(lambda: pair.session.fleet.monitor("dst").migration(),
                   lambda m: m.status is MigrationStatus.POSTCOPY_PAUSED, what="destination paused")
    port = free_port()
    await pair.ok(f"@dst migrate_recover tcp:127.0.0.1:{port}")
    await pair.ok("@src migrate_set_parameter max-postcopy-bandwidth 1G")
    await pair.ok(f"@src migrate -r tcp:127.0.0.1:{port}")
    await pair.until_status("completed", timeout=60)
    await pair.dst.wait_heartbeats(2)
    check = await check_guest_memory(pair.session.fleet.monitor("dst"), WS, tmp_path)
    assert check.ok, check.summary()


async def test_estimate_predicts_each_strategy_and_starts_nothing(pair: Pair) -> None:
    text = await pair.ok("@src estimate --link 1gbit")
    assert "dirty rate:" in text and "link: 125 MB/s" in text
    for strategy in ("precopy (current limits)", "precopy, uncapped", "postcopy after the first pass"):
        assert strategy in text
    assert "Nothing was started." in text
    assert (await pair.session.fleet.monitor("src").migration()).status is MigrationStatus.NONE
    text = await pair.ok("@src migrate --to dst --estimate --link 1gbit")
    assert "destination: dst" in text
    assert (await pair.session.fleet.monitor("dst").status()).state is RunState.INMIGRATE


async def test_watch_view_shows_the_model(pair: Pair) -> None:
    from kvmshell.core.commands.results import Watch
    outcomes = await pair.session.run_line("@src migrate --to dst --bandwidth 2M --watch")
    assert outcomes[0].ok and isinstance(outcomes[0].result, Watch)
    await pair.until_status("active")
    await wait_for(lambda: pair.ok("@src info migrate"), lambda text: "model:" in text and "progress:" in text,
                   what="the live view")
    await pair.ok("@src migrate_cancel")
    await pair.finished()


async def test_the_destination_listens_where_the_request_says(pair: Pair, tmp_path: Path) -> None:
    """With a listen URI (the far end of an SSH tunnel), the destination listens there and the source
    connects to the URI: here a unix socket relayed to the listening one by the test."""
    listen, near = tmp_path / "far.sock", tmp_path / "near.sock"
    relay = await asyncio.start_unix_server(lambda r, w: _pipe_to(listen, r, w), path=str(near))
    try:
        job = MigrationJob.of(pair.session.fleet, MigrationRequest("src", "dst", uri=f"unix:{near}",
                                                                   listen_uri=f"unix:{listen}", strategy="precopy"))
        await job.prepare()
        assert listen.is_socket(), "the destination does not listen at the listen URI"
        await job.start()
        outcome = await asyncio.wait_for(job.run(), 60)
        assert outcome.ok, outcome.message
    finally:
        relay.close()
        await relay.wait_closed()
    check = await check_guest_memory(pair.session.fleet.monitor("dst"), WS, tmp_path)
    assert check.ok, check.summary()


async def _pipe_to(path: Path, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    far_r, far_w = await asyncio.open_unix_connection(str(path))

    async def copy(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        try:
            while data := await r.read(1 << 16):
                w.write(data)
                await w.drain()
        finally:
            w.close()

    await asyncio.gather(copy(reader, far_w), copy(far_r, writer), return_exceptions=True)


async def test_auto_switches_to_postcopy_once_the_verdict_holds_and_it_is_cheaper(lab: Lab, tmp_path: Path) -> None:
    # the working set rewritten flat out cannot converge at 4 MB/s within 20 ms; throttling it enough
    # would cost the guest more than postcopy pulling 16 MiB does
    src = await lab.start("src", MonitorKind.QMP_UNIX, ws_pages=WS, ram_mib=RAM)
    dst = await lab.start("dst", MonitorKind.QMP_UNIX, ws_pages=WS, ram_mib=RAM, incoming=True, disk=src.disk)
    async with attached(src, dst) as pair:
        trace = tmp_path / "run.jsonl"
        await pair.ok(f"@src migrate --to dst --strategy auto --allow-postcopy --bandwidth 4M --downtime 20 "
                      f"--trace {trace}")
        ev = await pair.finished(timeout=120)
        assert ev.data["status"] == "completed", ev.data
        job = pair.job()
        names = [d.split(" ", 2)[1] for d in job.decisions]            # "t=8.1s postcopy: why"
        assert "postcopy:" in names and "throttle:" not in names, job.decisions
        said = job.decisions[names.index("postcopy:")]
        assert "held on" in said and "passes" in said and "of guest stalls" in said and "throttle:" in said, said
        await pair.dst.wait_heartbeats(2)
        check = await check_guest_memory(pair.session.fleet.monitor("dst"), WS, tmp_path)
        assert check.ok, check.summary()
        t = load_trace(trace)
        assert any(s.status.is_postcopy for s in t.samples)
        [decided] = [e for e in t.events if e.source == "kvmshell" and e.name == "postcopy"]
        assert decided.t > min(s.t for s in t.samples if s.pass_no >= 2)     # not before a verdict could hold
