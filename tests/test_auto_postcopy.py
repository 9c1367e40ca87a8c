"""auto with --allow-postcopy --preflight against real QEMU, on a guest that pre-copy would move, slowly:
the pre-flight weighs postcopy at once against pre-copy (model/choice.py), chooses postcopy and says
why in numbers, auto starts it on the first sample, the guest's memory checks out on the destination
and the source's migration settings are put back."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from kvmshell.core.migration.live.request import MigrationRequest
from kvmshell.core.migration.model.samples import load_trace
from kvmshell.core.values.models import MigrationStatus

WS = 8192                 # a 32 MiB working set (of 64 MiB)...
PACE = 8                  # ...dirtied at 8 pages a tick: QEMU sees ~16 MB/s under TCG (tests/test_strategies.py)
RAM = 64
# The pre-flight's low end is half the rate its 1 s window saw (model/dirty.py, MIGRATING_SHARE). On this
# shared 2-core machine that window saw 15-37 MB/s over 10 runs (the TCG guest runs as fast as it gets CPU):
# at 16 MB/s pre-copy then converges at the low end in 2.4x postcopy at once's time (5.9 s against 2.5 s) and
# never at the high end, or (the window at its top) never at either. Both are postcopy at once, with numbers;
# which of the two the measurement says is the unit tests' business (tests/test_choice.py).
BANDWIDTH = 16_000_000


def said(job: Any, name: str) -> list[str]:
    return [d for d in job.decisions if d.split(" ", 2)[1] == f"{name}:"]


@pytest.mark.qemu
@pytest.mark.timeout(120)
async def test_live_auto_starts_postcopy_at_once_where_it_beats_a_slow_precopy(lab: Any, tmp_path: Path) -> None:
    from kvmshell.core.migration.live.begin import begin
    from kvmshell.lab.launcher import MonitorKind
    from kvmshell.lab.verify import check_guest_memory
    from tests.guests import attached

    src = await lab.start("src", MonitorKind.QMP_UNIX, ws_pages=WS, pace=PACE, ram_mib=RAM)
    dst = await lab.start("dst", MonitorKind.QMP_UNIX, ws_pages=WS, ram_mib=RAM, incoming=True, disk=src.disk)
    trace = tmp_path / "run.jsonl"
    async with attached(src, dst) as pair:
        fleet = pair.session.fleet
        mon = fleet.monitor("src")
        before = (dict((await mon.migrate_capabilities()).states), dict((await mon.migrate_parameters()).values))
        job = await begin(fleet, MigrationRequest("src", "dst", strategy="auto", bandwidth=BANDWIDTH, downtime_ms=50,
                                                  allow_postcopy=True, preflight=True, trace_path=str(trace)))
        outcome = await asyncio.wait_for(job.run(), 90)
        assert outcome.ok, (outcome.full_message, job.decisions)
        # the decision, with the comparison in numbers
        [pre] = said(job, "preflight")
        faster = ("postcopy at once: 1.5x faster than pre-copy or more where the guest dirties most, no more than 10 % "
                  "slower where it dirties least (")
        assert pre.split(": ", 1)[1].startswith((faster, "postcopy at once: pre-copy will not converge (")), pre
        assert "s with the guest faulting pages in, downtime ~10 ms; pre-copy: " in pre, pre
        if faster in pre:                        # pre-copy would converge at the low end: the ratio is said
            assert "pre-copy at the low end: will converge" in pre and "x at the low end" in pre, pre
            assert "postcopy needs 1.5x at the high end, 0.91x at the low" in pre, pre
        else:
            assert "pre-copy: never;" in pre, pre
        assert "random pages read: " in pre and "% zero" in pre, pre
        [postcopy] = said(job, "postcopy")
        assert postcopy.split(": ", 1)[1].startswith("switching to postcopy: the pre-flight chose postcopy at once "
                                                     "(pass 1 at "), postcopy
        # started on the first sample of the running migration, and it completed in postcopy
        t = load_trace(trace)
        [decided] = [e for e in t.events if e.source == "kvmshell" and e.name == "postcopy"]
        active = [s for s in t.samples if s.status is MigrationStatus.ACTIVE]
        assert active and decided.t <= active[0].t + 0.05, (decided.t, active[0].t)
        assert any(s.status.is_postcopy for s in t.samples)
        assert t.samples[-1].status is MigrationStatus.COMPLETED
        # the guest's memory on the destination
        await pair.dst.wait_heartbeats(2)
        check = await check_guest_memory(fleet.monitor("dst"), WS, tmp_path)
        assert check.ok, check.summary()
        # the source's settings as they were
        after = (dict((await mon.migrate_capabilities()).states), dict((await mon.migrate_parameters()).values))
        assert after == before
