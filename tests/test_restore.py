"""A migration leaves the source's migration settings as they were: after a cancel, a failure at
once, a destination killed, a stall, a success, and a cancelled `--copy-storage`, with real QEMU
guests (the pair of tests/test_live.py, the rig of tests/test_storage.py)."""

from __future__ import annotations

import os
import signal
from collections.abc import Mapping

import pytest

from kvmshell.core.monitor.base import Monitor
from kvmshell.core.values.models import ParamValue, RunState
from tests import test_live, test_storage
from tests.test_live import Pair
from tests.test_storage import HOLD, Rig, qcow2, start_pair
from tests.waiting import free_port, wait_for

pytestmark = [pytest.mark.qemu, pytest.mark.timeout(90)]

pair, rig = test_live.pair, test_storage.rig          # the fixtures: a QMP source and an HMP destination; the rig
Settings = tuple[Mapping[str, bool], Mapping[str, ParamValue]]


async def settings(mon: Monitor) -> Settings:
    return dict((await mon.migrate_capabilities()).states), dict((await mon.migrate_parameters()).values)


async def user_settings(p: Pair) -> Settings:
    """The source with settings of its user's (not QEMU's defaults), which kvmshell then changes."""
    await p.ok("@src migrate_set_parameter cpu-throttle-initial 35")
    await p.ok("@src migrate_set_parameter downtime-limit 400")
    return await settings(p.session.fleet.monitor("src"))


def changed(before: Settings, during: Settings) -> set[str]:
    return {k for k, v in during[0].items() if before[0].get(k) != v} | \
        {k for k, v in during[1].items() if before[1].get(k) != v}


@pytest.mark.parametrize("strategy", ["converge", "auto"])
async def test_cancelled_migration_puts_the_source_back(pair: Pair, strategy: str) -> None:
    src = pair.session.fleet.monitor("src")
    before = await user_settings(pair)
    await pair.ok(f"@src migrate --to dst --strategy {strategy} --bandwidth 2M --downtime 200 --stall-timeout 60")
    await pair.until_status("active")
    during = await settings(src)
    assert {"events", "auto-converge", "max-bandwidth", "downtime-limit"} <= changed(before, during), during
    assert during[1]["max-bandwidth"] == 2 << 20
    await pair.ok("@src migrate_cancel")
    ev = await pair.finished()
    assert ev.data["status"] == "cancelled", ev.data
    assert await settings(src) == before
    msg = ev.data["message"]
    assert "migration settings put back: on src " in msg and "auto-converge off" in msg, msg
    assert "cpu-throttle-initial 35" in msg and "downtime-limit 400" in msg, msg
    assert (await src.status()).state is RunState.RUNNING


async def test_migration_that_fails_at_once_puts_the_source_back(pair: Pair) -> None:
    src = pair.session.fleet.monitor("src")
    before = await user_settings(pair)
    o = await pair.run(f"@src migrate --strategy converge --bandwidth 2M tcp:127.0.0.1:{free_port()}")
    assert not o.ok and "failed at once" in (o.error or ""), o.error
    assert "migration settings put back: on src " in (o.error or ""), o.error
    assert await settings(src) == before
    assert (await src.status()).state is RunState.RUNNING


async def test_destination_killed_puts_the_source_back(pair: Pair) -> None:
    src = pair.session.fleet.monitor("src")
    before = await user_settings(pair)
    await pair.ok("@src migrate --to dst --strategy converge --bandwidth 2M")
    await pair.until_status("active")
    os.kill(pair.dst.pid, signal.SIGKILL)
    ev = await pair.finished()
    assert ev.data["status"] == "failed", ev.data
    assert await settings(src) == before
    msg = ev.data["message"]
    assert "migration settings put back: on src " in msg and "dst has quit" in msg, msg


async def test_stalled_migration_puts_the_source_back(pair: Pair) -> None:
    src = pair.session.fleet.monitor("src")
    before = await user_settings(pair)
    await pair.ok("@src migrate --to dst --strategy auto --stall-timeout 2 --bandwidth 50M")
    await pair.until_status("active")
    os.kill(pair.dst.pid, signal.SIGSTOP)            # frozen: the watchdog cancels
    try:
        ev = await pair.finished(timeout=60)
        assert ev.data["status"] == "stalled", ev.data
        assert await settings(src) == before
        msg = ev.data["message"]
        assert "migration settings put back: on src " in msg, msg
        # the frozen destination does not answer: said, not waited for
        assert "could not put back dst's migration settings" in msg and "no answer" in msg, msg
    finally:
        os.kill(pair.dst.pid, signal.SIGCONT)


async def test_completed_migration_puts_the_source_back(pair: Pair) -> None:
    src, dst = pair.session.fleet.monitor("src"), pair.session.fleet.monitor("dst")
    before = await user_settings(pair)
    dst_before = await settings(dst)
    await pair.ok("@src migrate --to dst --strategy converge")
    ev = await pair.finished()
    assert ev.data["status"] == "completed", ev.data
    assert (await src.status()).state is RunState.POSTMIGRATE
    assert await settings(src) == before
    # the destination: events stays on (the guest runs there), the rest as it was
    caps, params = await settings(dst)
    assert caps["events"] and not dst_before[0]["events"]
    assert {k: v for k, v in caps.items() if k != "events"} == {k: v for k, v in dst_before[0].items() if k != "events"}
    assert params == dst_before[1]
    assert "events kept on on dst" in ev.data["message"], ev.data


async def test_cancelled_copy_storage_turns_pause_before_switchover_off_again(rig: Rig) -> None:
    w = rig.lab.workdir
    await start_pair(rig, await qcow2(w / "src-data.qcow2"), await qcow2(w / "dst-data.qcow2"))
    src = rig.mon("src")
    before = await settings(src)
    assert not before[0]["pause-before-switchover"]
    await rig.ok(f"@src migrate --to dst --copy-storage all {HOLD}")
    await wait_for(lambda: src.migration(), lambda m: m.status.value == "active", what="RAM under way")
    assert (await src.migrate_capabilities())["pause-before-switchover"]
    await rig.ok("@src migrate_cancel")
    ev = await rig.finished()
    assert ev.data["status"] == "cancelled", ev.data
    assert await settings(src) == before
    assert "pause-before-switchover off" in ev.data["message"], ev.data
