"""Many guests: concurrent attach, event fan-in, reconnect after QEMU is killed and restarted."""

from __future__ import annotations

import asyncio

import pytest

from kvmshell.core.monitor.fleet import CONNECTED_EVENT, Fleet, GuestState
from kvmshell.core.values.models import Event, RunState
from kvmshell.lab.launcher import Lab, MonitorKind

pytestmark = pytest.mark.qemu


async def next_event(queue: asyncio.Queue[Event], name: str, guest: str, timeout: float = 20) -> Event:
    async with asyncio.timeout(timeout):
        while True:
            ev = await queue.get()
            if ev.name == name and ev.guest == guest:
                return ev


async def test_eight_guests_at_once(lab: Lab) -> None:
    kinds = list(MonitorKind)
    guests = await asyncio.gather(*(lab.start(f"vm{i}", kinds[i % len(kinds)], paused=True) for i in range(8)))
    events: asyncio.Queue[Event] = asyncio.Queue()
    async with Fleet() as fleet:
        fleet.subscribe(events.put_nowait)
        for g in guests:
            fleet.add(g.name, g.address)
        await fleet.start()
        assert [g.state for g in fleet] == [GuestState.CONNECTED] * 8
        statuses = await asyncio.gather(*(fleet.monitor(g.name).status() for g in guests))
        assert {s.state for s in statuses} == {RunState.PRELAUNCH}
        # events from every QMP guest arrive on the one fleet subscription, tagged with the guest
        qmp_names = [g.name for g in guests if g.address.protocol.value == "qmp"]
        await asyncio.gather(*(fleet.monitor(n).execute("cont") for n in qmp_names))
        got = set()
        async with asyncio.timeout(20):
            while got != set(qmp_names):
                ev = await events.get()
                if ev.name == "RESUME":
                    got.add(ev.guest)


@pytest.mark.parametrize("kind", [MonitorKind.QMP_UNIX, MonitorKind.HMP_UNIX, MonitorKind.QMP_TCP],
                         ids=lambda k: k.value)
async def test_reconnect_after_qemu_killed_and_restarted(lab: Lab, kind: MonitorKind) -> None:
    guest = await lab.start("vm", kind, paused=True)
    other = await lab.start("other", MonitorKind.QMP_UNIX, paused=True)
    events: asyncio.Queue[Event] = asyncio.Queue()
    async with Fleet(backoff=(0.05, 0.5)) as fleet:
        fleet.subscribe(events.put_nowait)
        fleet.add("vm", guest.address)
        fleet.add("other", other.address)
        await fleet.start()
        await guest.kill()
        ev = await next_event(events, "kvmshell.DISCONNECTED", "vm")
        assert ev.data["reason"]
        assert fleet.get("vm").state in (GuestState.UNREACHABLE, GuestState.CONNECTING)
        # the other guest does not notice
        assert (await fleet.monitor("other").status()).state is RunState.PRELAUNCH
        if kind is MonitorKind.QMP_TCP:      # a new QEMU gets a new port: disconnect detection is the point here
            return
        restarted = await lab.start("vm", kind, paused=True)
        assert restarted.address == guest.address
        await next_event(events, CONNECTED_EVENT, "vm")
        assert fleet.get("vm").state is GuestState.CONNECTED
        assert (await fleet.monitor("vm").status()).state is RunState.PRELAUNCH
        assert fleet.get("vm").attempts >= 2
